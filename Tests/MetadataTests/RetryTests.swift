import Foundation
import Metadata
import Testing

/// A store whose `getShard` fails with scripted errors before answering.
final class FlakyStore: MetadataStore, @unchecked Sendable {
    private let lock = NSLock()
    private var script: [MetadataError]
    private(set) var calls = 0

    init(failures: [MetadataError]) { script = failures }

    func getShard(_ shardID: UInt64) async throws -> ShardRecord {
        let failure: MetadataError? = lock.withLock {
            calls += 1
            return script.isEmpty ? nil : script.removeFirst()
        }
        if let failure { throw failure }
        return ShardRecord(shardID: shardID, volumeID: "v", ownerClientID: "c", sizeLimit: 1)
    }

    var callCount: Int { lock.withLock { calls } }

    func registerNode(_ node: NodeRecord) async throws {}
    func unregisterNode(_ nodeID: String) async throws {}
    func getNode(_ nodeID: String) async throws -> NodeRecord { throw MetadataError.notFound(nodeID) }
    func listNodes() async throws -> [NodeRecord] { [] }
    func generateShardID() async throws -> UInt64 { 1 }
    func claimShardID(_ id: UInt64) async throws {}
    func createShard(_ shard: ShardRecord) async throws {}
    func updateShardState(_ shardID: UInt64, to state: ShardRecordState) async throws -> ShardRecord { try await getShard(shardID) }
    func deleteShard(_ shardID: UInt64) async throws {}
    func listShards(volumeID: String?) async throws -> [ShardRecord] { [] }
    func registerVolume(_ volume: VolumeRecord) async throws {}
    func getVolume(_ volumeID: String) async throws -> VolumeRecord { throw MetadataError.notFound(volumeID) }
    func listVolumes(nodeID: String?) async throws -> [VolumeRecord] { [] }
    func updatePrimary(volumeID: String, nodeID: String, expectedEpoch: UInt64) async throws -> VolumeRecord {
        throw MetadataError.notFound(volumeID)
    }
    func updateVolumeFacts(_ volumeID: String, _ facts: VolumeFacts, ifPrimary nodeID: String?) async throws {}
    func addBackup(volumeID: String, nodeID: String) async throws {}
    func removeBackup(volumeID: String, nodeID: String) async throws {}
    func unregisterVolume(_ volumeID: String) async throws {}
    func publishViews(_ views: VolumeViews) async throws {}
    func getViews(_ volumeID: String) async throws -> VolumeViews? { nil }
    func acknowledgeViews(volumeID: String, nodeID: String, generation: UInt64) async throws {}
    func viewAcknowledgements(_ volumeID: String) async throws -> [String: UInt64] { [:] }
    func changes() -> AsyncStream<MetadataEvent> { AsyncStream { $0.finish() } }
}

// Timing bounds here are loose on purpose: tests share two CPUs and a small
// thread pool, so a sleep may wake late. Attempt counts carry the assertions.
let fastPolicy = RetryPolicy(initialBackoff: .milliseconds(5), multiplier: 2, maxBackoff: .milliseconds(40),
                             deadline: .seconds(120))
let shortDeadline = RetryPolicy(initialBackoff: .milliseconds(5), multiplier: 2, maxBackoff: .milliseconds(20),
                                deadline: .milliseconds(300))

@Suite struct RetryTests {
    @Test func transientFailuresAreRetriedUntilSuccess() async throws {
        let flaky = FlakyStore(failures: [.unavailable("down"), .timeout("slow"), .unavailable("down")])
        let store = RetryingMetadataStore(flaky, policy: fastPolicy)
        #expect(try await store.getShard(3).shardID == 3)
        #expect(flaky.callCount == 4)
    }

    @Test(arguments: [MetadataError.notFound("x"), .alreadyExists("x"), .conflict("x"), .invalidArgument("x"),
                      .unauthorized("x"), .failed("x")])
    func permanentFailuresFailAtOnce(_ error: MetadataError) async throws {
        let flaky = FlakyStore(failures: [error])
        let store = RetryingMetadataStore(flaky, policy: fastPolicy)
        await #expect(throws: error) { try await store.getShard(3) }
        #expect(flaky.callCount == 1)  // no retry
    }

    @Test func givesUpAtTheDeadline() async throws {
        let flaky = FlakyStore(failures: Array(repeating: .unavailable("down"), count: 1000))
        let store = RetryingMetadataStore(flaky, policy: shortDeadline)
        let started = ContinuousClock.now
        do {
            _ = try await store.getShard(3)
            Issue.record("expected deadlineExceeded")
        } catch let error as MetadataError {
            guard case .deadlineExceeded(let message) = error else { Issue.record("got \(error)"); return }
            #expect(message.contains("down"))
        }
        let elapsed = ContinuousClock.now - started
        #expect(elapsed >= .milliseconds(250), "gave up after \(elapsed), before the deadline")
        #expect(flaky.callCount >= 2)
    }

    @Test func cancellationStopsRetrying() async throws {
        let flaky = FlakyStore(failures: Array(repeating: .unavailable("down"), count: 1000))
        // A backoff far longer than the bound below, so the bound holds on a loaded machine.
        let store = RetryingMetadataStore(flaky, policy: RetryPolicy(initialBackoff: .seconds(60), multiplier: 1,
                                                                     maxBackoff: .seconds(60), deadline: .seconds(600)))
        let task = Task { try await store.getShard(1) }
        try await Task.sleep(for: .milliseconds(50))
        task.cancel()
        let started = ContinuousClock.now
        await #expect(throws: CancellationError.self) { _ = try await task.value }
        // Below the 60 s backoff, so a retry loop that waits it out fails; not
        // lower: with the whole suite at once the task has taken 26 s to resume.
        #expect(ContinuousClock.now - started < .seconds(45))
        #expect(flaky.callCount == 1)
    }
}
