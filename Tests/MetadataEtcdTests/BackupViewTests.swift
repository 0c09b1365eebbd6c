import Foundation
import Metadata
import MetadataEtcd
import NodeSupport
import ShardNode
import ShardStore
import TestSupport
import Synchronization
import Testing

/// A primary and a backup of one volume, in one process, sharing etcd and a
/// folder volume (docs/BACKUP-VIEWS.md): the backup serves views that follow the
/// primary, every value it returns is one the primary committed, deletes wait for
/// the backup, and a backup whose primary is gone takes the volume over.
@Suite(.serialized) struct BackupViewTests {
    static func config(_ dir: TemporaryDirectory, node: String, etcd: LocalEtcd, initialVolumes: Int = 1,
                       leaseTTL: Int = 10) throws -> Configuration {
        var config = Configuration()
        try config.set("node.node_id", node)
        try config.set("node.data_dir", dir.sub(node))
        try config.set("cloud.volume_root", dir.sub("volumes"))
        try config.set("cloud.initial_volumes", String(initialVolumes))
        try config.set("metadata.type", "etcd")
        try config.set("metadata.endpoints", etcd.endpoint)
        try config.set("metadata.namespace", "/backup-views")
        // Long enough that a loaded machine (the suite runs suites in parallel) does
        // not let a lease run short between keepalives.
        try config.set("metadata.options.lease_ttl_s", String(leaseTTL))
        try config.set("metadata.retry.deadline_ms", "3000")
        try config.set("shard.size_limit", "512MiB")  // pins held while a loaded backup is slow to acknowledge grow the file
        try config.set("backup.view_interval_ms", "50")
        try config.set("backup.failover_delay_ms", "200")
        return config
    }

    struct SetupFailure: Error, CustomStringConvertible { let description: String }

    /// Node A, the primary, its volume, and a new shard of client "c". A 30 s
    /// lease: at the suite's start, hundreds of tests on two vCPUs once kept every
    /// keepalive from etcd for over 10 s, and the primary rightly refused writes.
    static func startPrimary(_ dir: TemporaryDirectory, etcd: LocalEtcd) async throws -> (node: StorageNode, volume: String, shard: Shard) {
        let a = try await StorageNode.start(try config(dir, node: "node-a", etcd: etcd, leaseTTL: 30))
        guard let volume = a.volumes.mountedVolumes().first?.volumeID else { throw SetupFailure(description: "node-a mounted no volume") }
        return (a, volume, try await a.shards.newShard(owner: "c"))
    }

    /// Node B, started and made a backup of `volume` (whose primary is `a`); returns once it serves `shard`.
    static func startBackup(_ dir: TemporaryDirectory, etcd: LocalEtcd, leaseTTL: Int, of volume: String, primary a: StorageNode,
                            serving shard: UInt64) async throws -> StorageNode {
        let b = try await StorageNode.start(try config(dir, node: "node-b", etcd: etcd, initialVolumes: 0, leaseTTL: leaseTTL))
        try await a.metadata.addBackup(volumeID: volume, nodeID: "node-b")
        guard await waitUntil(5, { b.views.serves(shard) }) else { throw SetupFailure(description: "node-b does not serve shard \(shard)") }
        return b
    }

    /// Runs `body` with etcd, a folder for the nodes, and node A, the primary,
    /// with a new shard of client "c"; stops A's roles after it (a backup the
    /// body starts, the body stops).
    static func withPrimary(_ name: String,
                            _ body: (LocalEtcd, TemporaryDirectory, StorageNode, String, Shard) async throws -> Void) async throws {
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let dir = try TemporaryDirectory(name)
            defer { dir.remove() }
            let (a, volume, shard) = try await startPrimary(dir, etcd: etcd)
            try await body(etcd, dir, a, volume, shard)
            await a.stopRoles()
        } }
    }

    @Test func backupServesViewsThatFollowThePrimaryAndAreNeverWrong() async throws {
        try await Self.withPrimary("backup-views") { etcd, dir, a, volume, shard in
            let keys = (0..<200).map { "k\($0)" }
            // Values of several sizes, a few chunked (over 128 KiB): overflow pages and chunk sets.
            @Sendable func size(_ i: Int) -> Int { i % 50 == 0 ? 300_000 : 100 + (i * 37) % 3000 }
            for (i, key) in keys.enumerated() {
                try shard.put(try EntryKey(key), value: CheckedValue.make(key: key, version: 0, size: size(i)), clientID: "c")
            }
            // B runs before it is made a backup: it follows without a restart.
            let b = try await StorageNode.start(try Self.config(dir, node: "node-b", etcd: etcd, initialVolumes: 0, leaseTTL: 30))
            #expect(!b.views.serves(shard.id))
            try await a.metadata.addBackup(volumeID: volume, nodeID: "node-b")
            #expect(try await waitUntil(5) { b.views.serves(shard.id) })

            // The primary rewrites every key, again and again (LMDB reuses pages all
            // the while); the backup reads continuously and checks each value.
            let writing = Atomic<Bool>(true)
            // Blocking LMDB writes run off Swift's cooperative threads, as the node
            // runs them: there are two here, and the node's lease keepalives need one.
            let writer = Task.detached {
                defer { writing.store(false, ordering: .releasing) }
                try await blockingWork {
                    for version in 1...30 {
                        for (i, key) in keys.enumerated() {
                            try shard.put(try EntryKey(key), value: CheckedValue.make(key: key, version: version, size: size(i)), clientID: "c")
                        }
                    }
                }
            }
            var reads = 0, wrong = 0, failed = 0
            var newest = [String: Int]()
            var lags: [Double] = []
            while writing.load(ordering: .acquiring) {
                for key in keys.shuffled().prefix(20) {
                    do {
                        guard let entry = try b.views.withView(shard.id, { try $0.get(try EntryKey(key)) }) else {
                            if failed == 0 { print("first failed read: not served") }
                            failed += 1
                            continue
                        }
                        reads += 1
                        guard let version = CheckedValue.version(entry.value, key: key) else { wrong += 1; continue }
                        // Versions of one key never go back.
                        if version < newest[key, default: 0] { wrong += 1 }
                        newest[key] = max(newest[key, default: 0], version)
                    } catch {
                        if failed == 0 { print("first failed read: \(error)") }
                        failed += 1
                    }
                }
                if let (_, publishedAt) = b.views.generation(of: volume) {
                    lags.append(Date().timeIntervalSince1970 - Double(publishedAt) / 1e9)
                }
                try await Task.sleep(for: .milliseconds(1))
            }
            try await writer.value
            // The view catches up with the last version of every key.
            #expect(try await waitUntil(3) {
                try keys.allSatisfy { key in
                    let entry = try b.views.withView(shard.id, { try $0.get(try EntryKey(key)) })
                    return entry.flatMap { CheckedValue.version($0.value, key: key) } == 30
                }
            })
            print("backup views: \(reads) reads, \(wrong) wrong, \(failed) failed; generation age p50 \(percentile(lags, 0.5)) s, max \(lags.max() ?? 0) s")
            #expect(wrong == 0)
            #expect(failed == 0)
            #expect(reads > 100)

            // A closed shard is served as closed.
            try await a.shards.closeShard(shard.id)
            #expect(try await waitUntil(3) { (try? b.views.withView(shard.id, { $0.state })) == .closed })

            // A deleted shard stops being served, and its files stay until the backup has left it.
            let doomed = try await a.shards.newShard(owner: "c")
            try doomed.put(try EntryKey("x"), value: [1, 2, 3], clientID: "c")
            // Index lookups on a view, short values and long (stored hashed) alike.
            let long = [UInt8](repeating: 7, count: 300)
            for (i, topic) in ["a", "b", "a", "a"].enumerated() {
                try doomed.put(try EntryKey("i\(i)"), value: [UInt8(i)], indexes: [IndexPair(name: "topic", value: topic), IndexPair(name: "blob", value: i == 1 ? long : [1])], clientID: "c")
            }
            #expect(try await waitUntil(3) { (try? b.views.withView(doomed.id, { try $0.find(indexName: "topic", value: Array("a".utf8)) }))??.count == 3 })
            let view = { (body: (ShardView) throws -> [EntryKey]) in try b.views.withView(doomed.id, body) ?? [] }
            #expect(try view { try $0.find(indexName: "topic", value: Array("a".utf8), after: try EntryKey("i0"), limit: 1) }.map(\.description) == ["i2"])
            #expect(try view { try $0.find(indexName: "blob", value: long) }.map(\.description) == ["i1"])
            #expect(try view { try $0.find(indexName: "blob", value: long) } == (try doomed.find(indexName: "blob", value: long)))
            #expect(throws: ShardError.self) { _ = try view { try $0.find(indexName: "", value: [1]) } }
            // A large value in a value file of its own (as the mount writes past 8 MiB), read through the view.
            let large = (0..<(9 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
            let file = try doomed.beginValueFile(clientID: "c")
            try large.withUnsafeBytes { try file.write($0, at: 0) }
            try file.commit(as: try EntryKey("large"))
            #expect(try await waitUntil(3) { (try? b.views.withView(doomed.id, { try $0.get(try EntryKey("large")).value })) == large })
            #expect(try b.views.withView(doomed.id, { try $0.read(try EntryKey("large"), offset: 5 << 20, count: 3) }) == Array(large[(5 << 20)..<((5 << 20) + 3)]))
            try await a.shards.deleteShard(doomed.id)
            #expect(try await waitUntil(3) { !b.views.serves(doomed.id) })
            let leftovers = dir.sub("volumes") + "/" + volume + "/shard-\(doomed.id).deleting"
            #expect(try await waitUntil(3) { !FileManager.default.fileExists(atPath: leftovers) })

            await b.stopRoles()
        }
    }

    /// A backup whose lease lapsed may hold views whose pins the primary has
    /// ended (it pins for live backups only) and whose pages it has reused: under
    /// its new lease it serves none of them until it has loaded the newest views
    /// again. Here the backup's metadata stream is held (as when it is behind),
    /// it is cut off from etcd past its lease while the primary rewrites every key,
    /// then, on a new lease, gets the stream's backlog before any read; the
    /// backup reads throughout: not one wrong or damaged value.
    @Test func aBackupWhoseLeaseLapsedLoadsTheNewestViewsBeforeServing() async throws {
        try await Self.withPrimary("backup-lease") { etcd, dir, a, volume, shard in
            let keys = (0..<200).map { "k\($0)" }
            @Sendable func size(_ i: Int) -> Int { i % 50 == 0 ? 300_000 : 100 + (i * 37) % 3000 }
            @Sendable func write(_ version: Int) throws {
                for (i, key) in keys.enumerated() {
                    try shard.put(try EntryKey(key), value: CheckedValue.make(key: key, version: version, size: size(i)), clientID: "c")
                }
            }
            try write(0)
            // A short lease for the backup: its keepalive comes every 2 s.
            let b = try await Self.startBackup(dir, etcd: etcd, leaseTTL: 6, of: volume, primary: a, serving: shard.id)
            b.views.updatesHeld = true

            // The primary rewrites every key until the backup has been back for a while.
            let writing = Atomic<Bool>(true)
            let writer = Task.detached { () -> Int in
                try await blockingWork {
                    var version = 0
                    while writing.load(ordering: .acquiring) {
                        version += 1
                        try write(version)
                    }
                    return version
                }
            }
            // The backup is cut off from etcd past its 6 s lease (its node record and
            // acknowledgements go with the lease), then reaches it again.
            guard let store = (b.metadata as? RetryingMetadataStore)?.base as? EtcdMetadataStore else {
                Issue.record("node-b does not keep its metadata in etcd")
                return
            }
            let leaseBefore = store.leaseState("node-b")?.generation
            store.keepalivesHeld = true
            defer { store.keepalivesHeld = false }
            // Its stream's backlog ends once its lease has run out in etcd (6 s).
            let backlogEndsAt = Date().addingTimeInterval(6.5), reconnectAt = Date().addingTimeInterval(9)
            var endAt = Date.distantFuture
            var reads = 0, readsSinceBack = 0, wrong = 0, damaged = 0, refused = 0, firstDamage = ""
            while Date() < endAt {
                if Date() >= backlogEndsAt { b.views.closeBacklog() }
                if store.keepalivesHeld && Date() >= reconnectAt {
                    store.keepalivesHeld = false
                    // Once it holds a new lease (and has had time to confirm it), the
                    // stream's backlog arrives — generations whose pins the primary
                    // ended while this node was not live — before any read.
                    #expect(try await waitUntil(10) { store.leaseState("node-b")?.generation != leaseBefore })
                    try await Task.sleep(for: .milliseconds(600))
                    await b.views.releaseUpdates()
                    b.views.updatesHeld = true
                    endAt = Date().addingTimeInterval(5)
                }
                // Half the keys until it is back, then the other half: pages its views
                // have not read yet, which their snapshot's cache cannot answer.
                let reading = store.keepalivesHeld ? keys[..<100] : keys[100...]
                for key in reading.shuffled().prefix(20) {
                    do {
                        guard let entry = try b.views.withView(shard.id, { try $0.get(try EntryKey(key)) }) else { refused += 1; continue }
                        reads += 1
                        if !store.keepalivesHeld { readsSinceBack += 1 }
                        if CheckedValue.version(entry.value, key: key) == nil { wrong += 1 }
                    } catch ShardError.notPrimary {
                        refused += 1  // no lease, or views not yet loaded again: not served
                    } catch {
                        if damaged == 0 { firstDamage = "\(error)" }
                        damaged += 1
                    }
                }
                try await Task.sleep(for: .milliseconds(1))
            }
            writing.store(false, ordering: .releasing)
            let versions = try await writer.value
            print("backup whose lease lapsed: \(versions) versions written; \(reads) reads (\(readsSinceBack) once back), \(wrong) wrong, \(damaged) damaged (\(firstDamage)), \(refused) refused; reloads \(b.views.reloadsAfterLeaseChange)")
            #expect(wrong == 0)
            #expect(damaged == 0)
            #expect(b.views.reloadsAfterLeaseChange >= 1)
            #expect(reads > 100)
            #expect(readsSinceBack > 50)  // it does serve again once it has loaded them
            // Following again, it catches up.
            await b.views.releaseUpdates()
            try write(versions + 1)
            #expect(try await waitUntil(5) {
                keys.allSatisfy { key in
                    let entry = try? b.views.withView(shard.id, { try $0.get(try EntryKey(key)) })
                    return entry.flatMap { CheckedValue.version($0.value, key: key) } == versions + 1
                }
            })
            await b.stopRoles()
        }
    }

    /// A backup whose stream is stuck and whose periodic fetches cannot run stops
    /// serving once it has not shown its views current for nearly a lease (here
    /// 5.5 s of a 6 s lease), and serves again once a fetch has.
    @Test func aBackupServesOnlyViewsItHasShownCurrentWithinALease() async throws {
        try await Self.withPrimary("backup-current") { etcd, dir, a, volume, shard in
            try shard.put(try EntryKey("k"), value: [1], clientID: "c")
            let b = try await Self.startBackup(dir, etcd: etcd, leaseTTL: 6, of: volume, primary: a, serving: shard.id)
            b.views.updatesHeld = true
            b.views.confirmationsHeld = true
            let held = Date()
            var servedFor = 0.0
            while Date().timeIntervalSince(held) < 8 {
                if (try? b.views.withView(shard.id, { try $0.get(try EntryKey("k")) })) != nil { servedFor = Date().timeIntervalSince(held) }
                try await Task.sleep(for: .milliseconds(50))
            }
            print("backup with its confirmations held: served for \(servedFor) s")
            #expect(servedFor < 6)
            #expect(throws: ShardError.self) { _ = try b.views.withView(shard.id, { try $0.get(try EntryKey("k")) }) }
            b.views.confirmationsHeld = false
            #expect(try await waitUntil(5) { (try? b.views.withView(shard.id, { try $0.get(try EntryKey("k")) })) != nil })
            await b.views.releaseUpdates()
            await b.stopRoles()
        }
    }

    /// A node that wins its volume back while an instance of its earlier term is
    /// still held (here by the test, as an open file would): that instance stays
    /// refused, and the take-over waits for it (LMDB opens an environment once
    /// per process), then opens the shard anew and writes it.
    @Test func aShardHeldFromAnEarlierTermStaysFencedAndIsReopenedOnceLetGo() async throws {
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let dir = try TemporaryDirectory("earlier-term")
            defer { dir.remove() }
            let k = try EntryKey("k")
            var held: Shard?
            let (a, volume) = try await { () async throws -> (StorageNode, String) in
                let (a, volume, first) = try await Self.startPrimary(dir, etcd: etcd)
                held = first  // the only reference kept past here
                return (a, volume)
            }()
            try held!.put(k, value: [1], clientID: "c")
            let id = held!.id
            let epoch = try await a.metadata.getVolume(volume).epoch
            // Another node wins the volume; A wins it back before it noticed.
            _ = try await a.metadata.updatePrimary(volumeID: volume, nodeID: "node-b", expectedEpoch: epoch)
            _ = try await a.metadata.updatePrimary(volumeID: volume, nodeID: "node-a", expectedEpoch: epoch + 1)
            try await Task.sleep(for: .seconds(3))
            #expect(a.shards.localShard(id) == nil, "the take-over opened the shard beside the held instance")
            #expect(throws: ShardError.self) { try held!.put(k, value: [9], clientID: "c") }
            held = nil
            let rewritten = try await waitUntil(30) {
                guard let shard = try? await a.shards.shard(id) else { return false }
                return (try? shard.put(k, value: [2], clientID: "c")) != nil
            }
            #expect(rewritten)
            #expect(a.shards.primaryEpoch(volume) == epoch + 2)
            #expect(try await a.shards.shard(id).get(k).value == [2])
            await a.stopRoles()
        } }
    }

    /// A backup that wins its volume (here by hand) but loses it to another node
    /// before it has checked the win writes nothing, lets go of what it mounted
    /// read-write, and serves the volume's views again once it backs it again.
    @Test func aBackupThatLosesAVolumeWhileTakingItOverServesItsViewsAgain() async throws {
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let dir = try TemporaryDirectory("lost-takeover")
            defer { dir.remove() }
            let k = try EntryKey("k")
            let (a, volume, id) = try await { () async throws -> (StorageNode, String, UInt64) in
                // This Shard is let go when A is deposed: not kept past here.
                let (a, volume, first) = try await Self.startPrimary(dir, etcd: etcd)
                try first.put(k, value: [1], clientID: "c")
                return (a, volume, first.id)
            }()
            let b = try await Self.startBackup(dir, etcd: etcd, leaseTTL: 10, of: volume, primary: a, serving: id)
            let epoch = try await a.metadata.getVolume(volume).epoch
            b.failover.beforeConfirmingTheWin = { volumeID in
                // Node A wins the volume back (by hand) and makes B its backup again.
                _ = try? await a.metadata.updatePrimary(volumeID: volumeID, nodeID: "node-a", expectedEpoch: epoch + 1)
                try? await a.metadata.addBackup(volumeID: volumeID, nodeID: "node-b")
            }
            _ = try await b.metadata.updatePrimary(volumeID: volume, nodeID: "node-b", expectedEpoch: epoch)
            // A takes the volume back at epoch + 2 and writes the shard again (a
            // Shard opened anew by its take-over).
            #expect(try await waitUntil(20) { a.shards.primaryEpoch(volume) == epoch + 2 })
            let rewritten = try await waitUntil(20) {
                guard let shard = try? await a.shards.shard(id) else { return false }
                return (try? shard.put(k, value: [2], clientID: "c")) != nil
            }
            #expect(rewritten)
            #expect(b.shards.primaryEpoch(volume) == nil)
            let served = try await waitUntil(20) {
                (try? b.views.withView(id, { try $0.get(k) }))?.value == [2]
            }
            #expect(served, "node-b serves no view of shard \(id) after losing the take-over")
            #expect(b.volumes.mountedVolumes().filter { $0.volumeID == volume }.map(\.readOnly) == [true])
            #expect(b.shards.primaryEpoch(volume) == nil)
            await b.stopRoles()
            await a.stopRoles()
        } }
    }

    /// A primary whose lease lapses (etcd stops answering for longer than the TTL)
    /// refuses every write, since another node may have won its volume; once etcd
    /// is back and the node has checked that it still holds the volume, it writes again.
    @Test func aPrimaryWhoseLeaseLapsedStopsWritingAndResumesOnceItHasCheckedItsRole() async throws {
        try await withHeavyTest { try await withLocalEtcd { etcd in
            let dir = try TemporaryDirectory("lease-lapse")
            defer { dir.remove() }
            var config = try Self.config(dir, node: "node-a", etcd: etcd)
            try config.set("metadata.options.call_timeout_ms", "500")
            let a = try await StorageNode.start(config)
            let shard = try await a.shards.newShard(owner: "c")
            try shard.put(try EntryKey("before"), value: [1], clientID: "c")
            etcd.pause()
            defer { etcd.resume() }
            try await Task.sleep(for: .seconds(11))  // past the 10 s lease
            #expect(throws: ShardError.self) { try shard.put(try EntryKey("during"), value: [2], clientID: "c") }
            etcd.resume()
            let resumed = try await waitUntil(30) {
                (try? shard.put(try EntryKey("after"), value: [3], clientID: "c")) != nil
            }
            #expect(resumed)
            #expect((try? shard.get(try EntryKey("during"))) == nil)
            await a.stopRoles()
        } }
    }
}
