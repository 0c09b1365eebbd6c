import Foundation
import Synchronization
import Metadata
import MetadataConformance
import TestSupport
import Testing
@testable import MetadataEtcd

/// Against a real etcd (one per test, started and destroyed by `withLocalEtcd`).
/// Serialized: the machine has 2 cores and several tests measure time.
@Suite(.serialized) struct EtcdMetadataStoreTests {

    /// The metadata contract (Tests/MetadataConformance), each check on a fresh etcd.
    @Test(arguments: MetadataContract.checks)
    func contract(_ check: MetadataContract.Check) async throws {
        try await withLocalEtcd { server in
            // Leases that outlast a loaded machine: expiry is not what the contract checks
            // (the lease tests below do), and a node whose lease lapsed mid-check is
            // briefly unlisted.
            try await check.run(on: MetadataBackend(open: { try makeStore(server, leaseTTL: 120) },
                                                    close: { await ($0 as! EtcdMetadataStore).close() }))
        }
    }

    /// The keys are the documented layout, under the namespace.
    @Test func keyLayoutUnderTheNamespace() async throws {
        try await withLocalEtcd { server in
            let store = try makeStore(server)
            try await store.registerNode(NodeRecord(nodeID: "n1", address: "10.0.0.1:7000"))
            _ = try await store.generateShardID()
            try await store.createShard(ShardRecord(shardID: 100, volumeID: "v1", ownerClientID: "c2", sizeLimit: 1))
            try await store.registerVolume(VolumeRecord(volumeID: "v1", primaryNodeID: "n1", mountPath: "/vol/v1"))
            let keys = try server.etcdctl(["get", "/test/", "--prefix", "--keys-only"])
            #expect(keys.contains("/test/shards/00000000000000000100"))
            #expect(keys.contains("/test/counters/shard-id"))
            #expect(keys.contains("/test/volumes/v1"))
            #expect(keys.contains("/test/nodes/n1"))
            await store.close()
        }
    }

    @Test func namespacesAreSeparate() async throws {
        try await withLocalEtcd { server in
            let one = try makeStore(server, namespace: "/one/")
            let two = try makeStore(server, namespace: "/two")
            #expect(try await one.generateShardID() == 1)
            #expect(try await two.generateShardID() == 1)
            try await one.registerVolume(VolumeRecord(volumeID: "v", primaryNodeID: "", mountPath: "/m"))
            #expect(try await two.listVolumes(nodeID: nil).isEmpty)
            await one.close()
            await two.close()
        }
    }

    @Test func shardIDsFromTwoStoresAreUniqueAndIncreasing() async throws {
        try await withLocalEtcd { server in
            // Two instances, each with its own curl pool and connections: as two
            // processes would be, short of a second executable.
            let stores = [try makeStore(server), try makeStore(server)]
            let perTask = 15
            let tasksPerStore = 6
            let sequences = try await withThrowingTaskGroup(of: [UInt64].self) { group in
                for store in stores {
                    for _ in 0..<tasksPerStore {
                        group.addTask {
                            var ids: [UInt64] = []
                            for _ in 0..<perTask { ids.append(try await store.generateShardID()) }
                            return ids
                        }
                    }
                }
                var all: [[UInt64]] = []
                for try await ids in group { all.append(ids) }
                return all
            }
            let all = sequences.flatMap { $0 }
            #expect(all.count == stores.count * tasksPerStore * perTask)
            #expect(Set(all).count == all.count, "IDs must be unique")
            #expect(Set(all) == Set(1...UInt64(all.count)), "no gaps without failures")
            for ids in sequences { #expect(ids == ids.sorted() && Set(ids).count == ids.count, "each caller's IDs increase") }
            for store in stores { await store.close() }
        }
    }

    @Test func claimAndCreateRaceWithGeneration() async throws {
        try await withLocalEtcd { server in
            let a = try makeStore(server)
            let b = try makeStore(server)
            try await a.claimShardID(50)
            await #expect(throws: MetadataError.alreadyExists("shard ID 50 is taken (IDs up to 50 have been handed out)")) {
                try await b.claimShardID(50)
            }
            await #expect(throws: MetadataError.self) { try await b.claimShardID(7) }
            // Concurrent claims of one ID: exactly one wins.
            let results = await withTaskGroup(of: Bool.self) { group in
                for i in 0..<8 {
                    let store = i % 2 == 0 ? a : b
                    group.addTask { (try? await store.claimShardID(60)) != nil }
                }
                var wins = 0
                for await won in group where won { wins += 1 }
                return wins
            }
            #expect(results == 1)
            // The product's flow for an explicit ID, claim then create, racing
            // generateShardID: 70 goes to exactly one of them.
            async let claimed: Bool = { () async -> Bool in
                guard (try? await a.claimShardID(70)) != nil else { return false }
                return (try? await a.createShard(ShardRecord(shardID: 70, volumeID: "v", ownerClientID: "c", sizeLimit: 1))) != nil
            }()
            var generated: [UInt64] = []
            for _ in 0..<15 { generated.append(try await b.generateShardID()) }
            let claimWon = await claimed
            #expect(claimWon != generated.contains(70), "claimed: \(claimWon), generated: \(generated)")
            #expect(try await a.generateShardID() > max(70, generated.max()!))
            await a.close()
            await b.close()
        }
    }

    @Test func guardedPrimaryChangeLosesToNewerEpoch() async throws {
        try await withLocalEtcd { server in
            let a = try makeStore(server)
            let b = try makeStore(server)
            try await a.registerVolume(VolumeRecord(volumeID: "v", primaryNodeID: "n0", mountPath: "/m"))
            // Many racers from epoch 1 on two stores: exactly one wins, the rest conflict.
            let outcomes = await withTaskGroup(of: Result<VolumeRecord, MetadataError>.self) { group in
                for i in 0..<10 {
                    let store = i % 2 == 0 ? a : b
                    group.addTask {
                        do { return .success(try await store.updatePrimary(volumeID: "v", nodeID: "n\(i + 1)", expectedEpoch: 1)) } catch let e as MetadataError {
                            return .failure(e)
                        } catch { return .failure(.failed("\(error)")) }
                    }
                }
                var all: [Result<VolumeRecord, MetadataError>] = []
                for await r in group { all.append(r) }
                return all
            }
            let winners = outcomes.compactMap { try? $0.get() }
            #expect(winners.count == 1)
            for case .failure(let error) in outcomes {
                #expect(error == .conflict("volume v is at epoch 2, not 1"))
            }
            let stored = try await b.getVolume("v")
            #expect(stored == winners.first)
            #expect(stored.epoch == 2)
            // The winner's epoch moves on; a concurrent backup change does not lose it.
            async let backup: Void = a.addBackup(volumeID: "v", nodeID: "x")
            let next = try await b.updatePrimary(volumeID: "v", nodeID: "n0", expectedEpoch: 2)
            try await backup
            #expect(next.epoch == 3)
            let final = try await a.getVolume("v")
            #expect(final.epoch == 3 && final.primaryNodeID == "n0" && final.backupNodeIDs.contains("x"))
            await a.close()
            await b.close()
        }
    }

    @Test func aRevokedLeaseIsReplacedAndTheNodeRegisteredAgain() async throws {
        try await withLocalEtcd { server in
            let node = try makeStore(server, leaseTTL: 2)
            let observer = try makeStore(server)
            try await node.registerNode(NodeRecord(nodeID: "n1", address: "10.0.0.1:7070"))
            let listed = try server.etcdctl(["lease", "list"])
            let leaseID = try #require(listed.split(separator: "\n").dropFirst().first.map(String.init), "\(listed)")
            // Someone revokes the node's lease: etcd deletes its key with it. The
            // next keepalive finds the lease gone and registers the node on a new one.
            _ = try server.etcdctl(["lease", "revoke", leaseID])
            var leases = "", back: NodeRecord?
            for _ in 0..<50 {
                try await Task.sleep(for: .milliseconds(100))
                leases = try server.etcdctl(["lease", "list"])
                back = try? await observer.getNode("n1")  // the key is put after the new lease is granted
                if back != nil && leases.contains("found 1 leases") && !leases.contains(leaseID) { break }
            }
            #expect(leases.contains("found 1 leases") && !leases.contains(leaseID), "\(leases)")
            #expect(back?.address == "10.0.0.1:7070")
            await node.close()
            await observer.close()
        }
    }

    /// A process that stands still for a whole TTL between being granted a lease
    /// and putting its node's key on it (CI's starved suite start did) takes a new
    /// lease instead of failing its start.
    @Test func aNewLeaseThatLapsesBeforeItsKeyIsPutIsReplaced() async throws {
        try await withLocalEtcd { server in
            let node = try makeStore(server, leaseTTL: 2)
            let observer = try makeStore(server)
            let lapsed = Mutex<[Int64]>([])
            node.afterLeaseGrant = { leaseID in
                // The first lease goes (as if its TTL passed) before the key is put on it.
                guard lapsed.withLock({ $0.isEmpty }) else { return }
                lapsed.withLock { $0.append(leaseID) }
                _ = try server.etcdctl(["lease", "revoke", String(leaseID, radix: 16)])
            }
            try await node.registerNode(NodeRecord(nodeID: "n1", address: "10.0.0.1:7070"))
            #expect(lapsed.withLock { $0.count } == 1)
            #expect(try await observer.getNode("n1").address == "10.0.0.1:7070")
            let leases = try server.etcdctl(["lease", "list"])
            #expect(leases.contains("found 1 leases"), "\(leases)")
            #expect(!leases.contains(String(lapsed.withLock { $0[0] }, radix: 16)), "\(leases)")
            await node.close()
            await observer.close()
        }
    }

    @Test func lapsedLeaseRemovesTheNode() async throws {
        try await withLocalEtcd { server in
            let dying = try makeStore(server, leaseTTL: 2)
            let observer = try makeStore(server)
            let survivor = try makeStore(server, leaseTTL: 2)
            _ = try await observer.listNodes()
            let events = EventCollector(observer.changes())
            try await dying.registerNode(NodeRecord(nodeID: "dying", address: ""))
            try await survivor.registerNode(NodeRecord(nodeID: "alive", address: ""))
            // The keepalives hold both nodes past their TTL.
            try await Task.sleep(for: .seconds(3))
            #expect(try await observer.listNodes().map(\.nodeID) == ["alive", "dying"])
            // "Crash": keepalives stop, nothing is revoked.
            await dying.close()
            let clock = ContinuousClock()
            let closedAt = clock.now
            let seen = await events.wait(until: { $0.contains(.nodeUnregistered(nodeID: "dying")) }, timeout: .seconds(8))
            #expect(seen.contains(.nodeUnregistered(nodeID: "dying")))
            #expect(clock.now - closedAt < .seconds(6))
            await #expect(throws: MetadataError.notFound("node dying")) { try await observer.getNode("dying") }
            #expect(try await observer.getNode("alive").nodeID == "alive")
            // unregisterNode revokes: the lease is gone at once.
            try await survivor.unregisterNode("alive")
            #expect(try await observer.listNodes().isEmpty)
            let leases = try server.etcdctl(["lease", "list"])
            #expect(leases.contains("found 0 leases"), "\(leases)")
            await survivor.close()
            await observer.close()
            events.cancel()
            // Calls on a closed store fail clearly.
            await #expect(throws: MetadataError.self) { try await dying.registerNode(NodeRecord(nodeID: "x", address: "")) }
        }
    }

    @Test func watchResumesAcrossAnEtcdRestart() async throws {
        try await withLocalEtcd { server in
            let store = try makeStore(server)
            // The watch waits 3 s before reconnecting, longer than an etcd restart
            // here, so the changes made right after each restart land while it is
            // disconnected: only resuming by revision delivers them.
            store.watchReconnectDelay = 3
            _ = try await store.listNodes()
            let events = EventCollector(store.changes())
            func create(_ ids: ClosedRange<Int>) async throws {
                for i in ids { try await store.createShard(ShardRecord(shardID: UInt64(i), volumeID: "v", ownerClientID: "c", sizeLimit: 1)) }
            }
            let clock = ContinuousClock()
            try await create(1...5)
            #expect(await events.wait(for: 5).count == 5)

            var down = clock.now
            try await server.restart()  // graceful
            try await create(6...10)
            #expect(clock.now - down < .milliseconds(2500), "etcd restarted too slowly for this test to mean anything")
            #expect(await events.wait(for: 10).count == 10)

            down = clock.now
            await server.kill9()  // crash
            try await server.start()
            try await create(11...15)
            #expect(clock.now - down < .milliseconds(2500), "etcd restarted too slowly for this test to mean anything")
            _ = await events.wait(for: 15)
            try await Task.sleep(for: .milliseconds(200))  // nothing more arrives

            let ids = events.all.compactMap { event -> UInt64? in
                if case .shardCreated(let s) = event { return s.shardID }
                return nil
            }
            #expect(ids == Array(1...15), "every event once, in order")
            #expect(events.all.count == 15)
            await store.close()
            events.cancel()
        }
    }

    @Test func retriesRideOutAnEtcdOutage() async throws {
        try await withLocalEtcd { server in
            let base = try makeStore(server, callTimeout: .milliseconds(500))
            let policy = RetryPolicy(initialBackoff: .milliseconds(50), multiplier: 1.5, maxBackoff: .milliseconds(300), deadline: .seconds(20))
            let store = RetryingMetadataStore(base, policy: policy)
            try await store.registerVolume(VolumeRecord(volumeID: "v", primaryNodeID: "n", mountPath: "/m"))
            await server.stop()
            // Work started while etcd is down completes once it is back.
            async let id = store.generateShardID()
            async let created: Void = store.createShard(ShardRecord(shardID: 40, volumeID: "v", ownerClientID: "c", sizeLimit: 1))
            async let moved = store.updatePrimary(volumeID: "v", nodeID: "m", expectedEpoch: 1)
            try await Task.sleep(for: .seconds(1))
            try await server.start()
            let generated = try await id
            try await created
            let volume = try await moved
            #expect(generated != 40)  // the claimed ID is never handed out again
            #expect(volume.epoch == 2)
            #expect(try await store.getShard(40).shardID == 40)
            #expect(try await store.generateShardID() > 40)

            // With etcd down past the deadline: deadlineExceeded, and nothing half-written.
            let short = RetryingMetadataStore(base, policy: RetryPolicy(
                initialBackoff: .milliseconds(50), multiplier: 1.5, maxBackoff: .milliseconds(200), deadline: .seconds(1)))
            let counterBefore = try await store.generateShardID()
            await server.kill9()
            let clock = ContinuousClock()
            let started = clock.now
            await #expect {
                try await short.createShard(ShardRecord(shardID: 500, volumeID: "v", ownerClientID: "c", sizeLimit: 1))
            } throws: { error in
                guard case MetadataError.deadlineExceeded = error else { return false }
                return true
            }
            #expect(clock.now - started < .seconds(3))
            try await server.start()
            // The txn did not happen at all: no shard, counter unmoved.
            await #expect(throws: MetadataError.notFound("shard 500")) { try await store.getShard(500) }
            #expect(try await store.generateShardID() == counterBefore + 1)
            await base.close()
        }
    }

    @Test func unreachableAndMalformedEndpoints() async throws {
        let port = try freeLoopbackPort()  // nothing listens there
        let store = try EtcdMetadataStore(configuration: EtcdConfiguration(
            endpoints: ["http://127.0.0.1:\(port)"], callTimeout: .milliseconds(500)))
        await #expect {
            try await store.listNodes()
        } throws: { error in
            guard let error = error as? MetadataError, error.isTransient, case .unavailable = error else { return false }
            return "\(error)".contains("127.0.0.1:\(port)")
        }
        let retrying = RetryingMetadataStore(store, policy: RetryPolicy(
            initialBackoff: .milliseconds(20), multiplier: 2, maxBackoff: .milliseconds(100), deadline: .milliseconds(500)))
        await #expect {
            try await retrying.generateShardID()
        } throws: { error in
            guard case MetadataError.deadlineExceeded = error else { return false }
            return true
        }
        await store.close()

        for bad in ["127.0.0.1:2379", "etcd", "ftp://127.0.0.1:2379", "http://", "http://host:port", "http://h:1/v3"] {
            #expect(throws: MetadataError.self, "\(bad)") {
                _ = try EtcdMetadataStore(configuration: EtcdConfiguration(endpoints: [bad]))
            }
        }
        #expect {
            _ = try EtcdMetadataStore(configuration: EtcdConfiguration(endpoints: ["nonsense"]))
        } throws: { error in
            guard case MetadataError.invalidArgument = error else { return false }
            return true
        }
        #expect(throws: MetadataError.self) { _ = try EtcdMetadataStore(configuration: EtcdConfiguration(endpoints: [])) }
    }

    @Test func failsOverToAWorkingEndpoint() async throws {
        try await withLocalEtcd { server in
            let dead = "http://127.0.0.1:\(try freeLoopbackPort())"
            let store = try EtcdMetadataStore(configuration: EtcdConfiguration(
                endpoints: [dead, server.endpoint], callTimeout: .seconds(2)))
            _ = try await store.listNodes()
            let events = EventCollector(store.changes())  // the watch fails over too
            try await store.registerVolume(VolumeRecord(volumeID: "v", primaryNodeID: "", mountPath: "/m"))
            #expect(try await store.getVolume("v").volumeID == "v")
            let seen = await events.wait(for: 1)
            #expect(seen.first == .volumeRegistered(VolumeRecord(volumeID: "v", primaryNodeID: "", mountPath: "/m")))
            await store.close()
            events.cancel()
        }
    }

    @Test func authentication() async throws {
        // A token TTL of 1 s: the re-authentication path runs too.
        try await withLocalEtcd(extraArguments: ["--auth-token-ttl", "1"]) { server in
            try server.etcdctl(["user", "add", "root:pw"])
            try server.etcdctl(["auth", "enable"])
            let good = try makeStore(server, username: "root", password: "pw")
            try await good.registerVolume(VolumeRecord(volumeID: "v", primaryNodeID: "", mountPath: "/m"))
            _ = try await good.listVolumes(nodeID: nil)
            let events = EventCollector(good.changes())
            try await Task.sleep(for: .milliseconds(2500))  // the token expires
            #expect(try await good.getVolume("v").volumeID == "v")
            #expect(try await good.generateShardID() == 1)
            let seen = await events.wait(for: 1, timeout: .milliseconds(300))
            #expect(seen.count == 0, "the counter is not an event")
            try await good.addBackup(volumeID: "v", nodeID: "b")
            #expect(await events.wait(for: 1).count == 1)

            let wrong = try makeStore(server, username: "root", password: "nope")
            await #expect {
                try await wrong.listNodes()
            } throws: { error in
                guard case MetadataError.unauthorized(let message) = error else { return false }
                return message.contains("authentication failed")
            }
            let anonymous = try makeStore(server)
            await #expect {
                try await anonymous.listNodes()
            } throws: { error in
                guard case MetadataError.unauthorized = error else { return false }
                return true
            }
            await good.close()
            await wrong.close()
            await anonymous.close()
            events.cancel()
        }
    }

    @Test func tlsWithClientCertificates() async throws {
        try await withLocalEtcd(tls: true) { server in
            let store = try EtcdMetadataStore(configuration: server.configuration())
            _ = try await store.listNodes()
            let events = EventCollector(store.changes())
            try await store.registerNode(NodeRecord(nodeID: "n", address: "a:1"))
            #expect(try await store.getNode("n").address == "a:1")
            #expect(await events.wait(for: 1).first == .nodeRegistered(NodeRecord(nodeID: "n", address: "a:1")))
            // Without the CA the server is not trusted: a clear, permanent error.
            var untrusted = server.configuration()
            untrusted.caFile = nil
            let stranger = try EtcdMetadataStore(configuration: untrusted)
            await #expect {
                try await stranger.listNodes()
            } throws: { error in
                guard let error = error as? MetadataError, !error.isTransient else { return false }
                return true
            }
            await stranger.close()
            await store.close()
            events.cancel()
        }
    }
}
