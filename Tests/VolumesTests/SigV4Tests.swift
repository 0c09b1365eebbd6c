import Foundation
import Testing
@testable import Volumes

@Suite struct SigV4Tests {
    static let exampleCredentials = AWSCredentials(accessKeyID: "AKIDEXAMPLE", secretAccessKey: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")

    /// AWS's published example: GET https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08 at 20150830T123600Z.
    @Test func awsPublishedListUsersExample() {
        let signed = SigV4Signer(service: "iam", region: "us-east-1").sign(
            method: "GET", host: "iam.amazonaws.com", path: "/", query: "Action=ListUsers&Version=2010-05-08",
            headers: [("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")], body: Data(),
            credentials: Self.exampleCredentials, date: Date(timeIntervalSince1970: 1_440_938_160))
        #expect(sha256Hex(Data(signed.canonicalRequest.utf8)) == "f536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59")
        #expect(signed.stringToSign == "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/iam/aws4_request\nf536975d06c0309214f805bb90ccff089219ecd68b2577efef23edd43b7e1a59")
        #expect(signed.authorization == "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
                + "SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7")
    }

    struct Case: Codable, Sendable {
        var method: String
        var host: String
        var path: String
        var query: String
        var body: String
        var key: String
        var secret: String
        var token: String
        var region: String
        var epoch: Double
    }

    static let cases: [Case] = [
        Case(method: "POST", host: "ec2.eu-west-1.amazonaws.com", path: "/", query: "",
             body: formEncode([("Action", "CreateVolume"), ("Version", "2016-11-15"), ("Size", "100"), ("VolumeType", "io2"),
                               ("Iops", "3000"), ("MultiAttachEnabled", "true"),
                               ("TagSpecification.1.Tag.1.Key", "name with spaces/and+plus"), ("TagSpecification.1.Tag.1.Value", "é~*")]),
             key: "AKIDEXAMPLE", secret: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token: "", region: "eu-west-1", epoch: 1_767_225_600),
        Case(method: "POST", host: "127.0.0.1:4566", path: "/", query: "",
             body: formEncode([("Action", "DescribeVolumes"), ("Version", "2016-11-15"), ("NextToken", "a/b=c")]),
             key: "ASIAEXAMPLE", secret: "s3cr3t+/=", token: "FwoGZXIvYXdzEXAMPLE//token==", region: "ap-southeast-2", epoch: 1_800_000_001),
        Case(method: "GET", host: "ec2.us-east-1.amazonaws.com", path: "/", query: "Action=DescribeVolumes&Version=2016-11-15&Filter.1.Value.1=i-0a%20b",
             body: "", key: "AKID", secret: "x", token: "", region: "us-east-1", epoch: 1_700_000_000),
    ]

    /// botocore's SigV4Auth signs the same requests; the Authorization headers must match byte for byte.
    @Test(arguments: cases)
    func matchesBotocore(_ c: Case) async throws {
        let script = """
        import json, sys, datetime
        import botocore.auth
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials
        c = json.load(sys.stdin)
        url = "https://" + c["host"] + c["path"] + ("?" + c["query"] if c["query"] else "")
        if ":" in c["host"]:
            url = "http://" + c["host"] + c["path"] + ("?" + c["query"] if c["query"] else "")
        headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
        r = AWSRequest(method=c["method"], url=url, data=c["body"].encode(), headers=headers)
        botocore.auth.get_current_datetime = lambda: datetime.datetime.fromtimestamp(c["epoch"], datetime.timezone.utc).replace(tzinfo=None)
        SigV4Auth(Credentials(c["key"], c["secret"], c["token"] or None), "ec2", c["region"]).add_auth(r)
        print(r.headers["Authorization"])
        """
        let expected = try await python(script, input: String(decoding: try JSONEncoder().encode(c), as: UTF8.self))
        let signed = SigV4Signer(service: "ec2", region: c.region).sign(
            method: c.method, host: c.host, path: c.path, query: c.query,
            headers: [("Content-Type", "application/x-www-form-urlencoded; charset=utf-8")], body: Data(c.body.utf8),
            credentials: AWSCredentials(accessKeyID: c.key, secretAccessKey: c.secret, sessionToken: c.token),
            date: Date(timeIntervalSince1970: c.epoch))
        #expect(expected.hasPrefix("AWS4-HMAC-SHA256 Credential="))
        #expect(signed.authorization == expected)
        if !c.token.isEmpty { #expect(signed.headers.contains { $0.0 == "X-Amz-Security-Token" && $0.1 == c.token }) }
    }

    @Test func percentEncodingIsRFC3986() {
        #expect(percentEncode("a b*c~d/é+=") == "a%20b%2Ac~d%2F%C3%A9%2B%3D")
    }
}

