import Foundation
import TestSupport
@testable import MetadataEtcd

extension LocalEtcd {
    /// A client configuration for this etcd (with the TLS files if any).
    func configuration(namespace: String = "/test", callTimeout: Duration = .seconds(2)) -> EtcdConfiguration {
        EtcdConfiguration(endpoints: [endpoint], namespace: namespace, caFile: tls?.ca, certFile: tls?.clientCert,
                          keyFile: tls?.clientKey, callTimeout: callTimeout)
    }
}

/// A store on `server` under a namespace of its own.
func makeStore(_ server: LocalEtcd, namespace: String = "/test", callTimeout: Duration = .seconds(2), leaseTTL: Int = 10,
               username: String? = nil, password: String? = nil) throws -> EtcdMetadataStore {
    try EtcdMetadataStore(configuration: EtcdConfiguration(
        endpoints: [server.endpoint], namespace: namespace, username: username, password: password,
        callTimeout: callTimeout, leaseTTL: leaseTTL))
}
