import Foundation
import Metadata
import Testing
@testable import MetadataEtcd

/// The gateway's JSON quirks and the watch stream's line splitting, without etcd.
struct EtcdWireTests {
    @Test func omittedFieldsMeanZero() throws {
        let failedTxn = #"{"header":{"revision":"7","raft_term":"2"},"responses":[{"response_range":{"header":{"revision":"7"}}}]}"#
        let txn = try JSONDecoder().decode(WireTxnResponse.self, from: Data(failedTxn.utf8))
        #expect(!txn.didSucceed)
        #expect(txn.header?.revision?.value == 7)
        #expect(txn.responses?.first?.response_range?.kvs == nil)

        let range = try JSONDecoder().decode(WireRangeResponse.self, from: Data(#"{"header":{"revision":"2"},"kvs":[{"key":"YQ==","create_revision":"2","mod_revision":"3","version":"2"}],"count":"1"}"#.utf8))
        let kv = try #require(range.kvs?.first)
        #expect(kv.keyString == "a")
        #expect(kv.valueData.isEmpty)
        #expect(kv.modRevision == 3 && kv.createRevision == 2)

        let deleted = try JSONDecoder().decode(WireDeleteRangeResponse.self, from: Data(#"{"header":{}}"#.utf8))
        #expect(deleted.deleted.int == 0)
    }

    @Test func errorMapping() {
        func map(_ code: Int, _ message: String, status: Int = 500) -> MetadataError {
            EtcdErrors.fromHTTP(status: status, body: Data(#"{"error":"\#(message)","message":"\#(message)","code":\#(code)}"#.utf8), endpoint: "e")
        }
        #expect(map(14, "etcdserver: no leader", status: 503).isTransient)
        #expect(map(14, "etcdserver: leader changed") == .unavailable("e: etcdserver: leader changed"))
        #expect(map(4, "context deadline exceeded") == .timeout("e: context deadline exceeded"))
        #expect(map(16, "etcdserver: invalid auth token") == .unauthorized("e: etcdserver: invalid auth token"))
        #expect(map(7, "etcdserver: permission denied") == .unauthorized("e: etcdserver: permission denied"))
        #expect(map(3, "etcdserver: authentication failed, invalid user ID or password", status: 400)
            == .unauthorized("e: etcdserver: authentication failed, invalid user ID or password"))
        #expect(map(5, "etcdserver: requested lease not found", status: 404) == .notFound("e: etcdserver: requested lease not found"))
        #expect(map(9, "etcdserver: something odd") == .failed("e: etcdserver: something odd"))
        #expect(EtcdErrors.fromHTTP(status: 503, body: Data("busy".utf8), endpoint: "e").isTransient)
    }

    @Test func watchLinesSplitAcrossChunks() async throws {
        let (stream, continuation) = AsyncStream<MetadataEvent>.makeStream()
        let client = try EtcdClient(configuration: EtcdConfiguration(), logger: .init(label: "test"))
        let watch = EtcdWatch(client: client, prefix: "/ns/", startRevision: 5, continuation: continuation, logger: .init(label: "test")) {
            kv, isDelete in EtcdMetadataStore.event(namespace: "/ns", kv, isDelete: isDelete)
        }
        func event(_ revision: Int, _ type: String?, _ id: String) -> String {
            let key = Data("/ns/volumes/\(id)".utf8).base64EncodedString()
            let value = Data(#"{"volumeID":"\#(id)","primaryNodeID":"","backupNodeIDs":[],"mountPath":"/m","epoch":1}"#.utf8).base64EncodedString()
            let typeField = type.map { #""type":"\#($0)","# } ?? ""
            return #"{\#(typeField)"kv":{"key":"\#(key)","create_revision":"\#(revision)","mod_revision":"\#(revision)","version":"1","value":"\#(value)"}}"#
        }
        let lines = [
            #"{"result":{"header":{"revision":"4"},"created":true}}"#,
            #"{"result":{"header":{"revision":"5"},"events":[\#(event(4, nil, "old"))]}}"#,  // before the start: skipped
            #"{"result":{"header":{"revision":"6"},"events":[\#(event(5, nil, "a")),\#(event(5, nil, "b"))]}}"#,
            #"{"result":{"header":{"revision":"7"},"events":[\#(event(6, "DELETE", "a"))]}}"#,
        ]
        let bytes = Array((lines.joined(separator: "\n") + "\n").utf8)
        // Feed in awkward pieces: 7 bytes at a time.
        var offset = 0
        while offset < bytes.count {
            let end = min(offset + 7, bytes.count)
            let ok = bytes[offset..<end].withUnsafeBytes { watch.receive($0) }
            #expect(ok)
            offset = end
        }
        watch.stop()
        var seen: [MetadataEvent] = []
        for await e in stream { seen.append(e) }
        let volume = { (id: String) in VolumeRecord(volumeID: id, primaryNodeID: "", mountPath: "/m") }
        #expect(seen == [.volumeRegistered(volume("a")), .volumeRegistered(volume("b")), .volumeUnregistered(volumeID: "a")])
        client.close()
    }

    @Test func paddedIDsSortNumerically() {
        #expect(EtcdMetadataStore.paddedID(42) == "00000000000000000042")
        #expect(EtcdMetadataStore.paddedID(UInt64.max) == "18446744073709551615")
        #expect(Wire.prefixEnd("/a/") == Data("/a0".utf8).base64EncodedString())
    }
}
