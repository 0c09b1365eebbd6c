import Foundation
import Metadata
import MetadataConformance
import TestSupport
import Testing

/// The embedded store keeps the metadata contract (Tests/MetadataConformance),
/// each check on a fresh folder.
@Suite struct EmbeddedMetadataStoreTests {
    @Test(arguments: MetadataContract.checks)
    func contract(_ check: MetadataContract.Check) async throws {
        let dir = try TemporaryDirectory("meta")
        // A store closes when its last reference goes.
        try await check.run(on: MetadataBackend(open: { try EmbeddedMetadataStore(path: dir.path) }, close: { _ in }))
    }
}
