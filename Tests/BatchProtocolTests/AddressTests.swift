import BatchProtocol
import Testing

@Suite struct AddressTests {
    @Test func hostAndPort() {
        #expect(splitHostPort("10.0.0.5:7070")! == ("10.0.0.5", 7070))
        #expect(splitHostPort("[::1]:80")! == ("::1", 80))
        #expect(splitHostPort(":9")! == ("127.0.0.1", 9))
        #expect(splitHostPort("node-a.example:1")! == ("node-a.example", 1))
    }

    @Test func notAnAddress() {
        for bad in ["", "7070", "host", "host:", "host:x", "host:70000", "host:-1"] {
            #expect(splitHostPort(bad) == nil, "\(bad)")
        }
        #expect(splitHostPort("host:0") == nil)  // a client cannot connect to port 0
        #expect(splitHostPort("host:0", allowingPortZero: true)! == ("host", 0))  // a server picks one
    }
}
