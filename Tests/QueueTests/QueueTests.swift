// QueueTests — everything of the queue and daemon layers that needs no database: the job lifecycle
// state machine, retry backoff, SHA-256, libpq text formats, configuration, collection checks.
@testable import Daemon
@testable import NoladCLI
@testable import Pipeline
import Models
import Foundation
import Imaging
@testable import Queue
import XCTest

final class JobLifecycleTests: XCTestCase {
    func testRun_whenStagesSucceed_marksSucceeded() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        XCTAssertEqual(life.executionFinished(.succeeded), .markSucceeded)
        XCTAssertTrue(life.isFinished)
    }

    func testRun_whenBadInput_failsAtOnceWithTheMessage_evenWithAttemptsLeft() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 5)
        XCTAssertEqual(life.executionFinished(.permanentFailure("collection folder /x does not exist")),
                       .markFailed("collection folder /x does not exist"))
    }

    func testRun_whenTransientError_andAttemptsLeft_schedulesRetryWithBackoff() {
        var life = JobLifecycle(attemptsUsed: 2, maxAttempts: 3, retry: RetryPolicy(base: 5, maximum: 600, jitter: 0.2))
        XCTAssertEqual(life.executionFinished(.transientFailure("connection reset"), unit: 0.5),
                       .scheduleRetry(delay: 9, error: "connection reset")) // 5·2¹ · (1 − 0.2·0.5)
    }

    func testRun_whenTransientError_onLastAttempt_givesUpWithCount() {
        var life = JobLifecycle(attemptsUsed: 3, maxAttempts: 3)
        XCTAssertEqual(life.executionFinished(.transientFailure("disk busy")), .markFailed("gave up after 3 attempts: disk busy"))
    }

    func testCancel_whileRunning_interruptsThenMarksCancelled() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        XCTAssertEqual(life.cancelRequested(), .interrupt(.cancelled))
        XCTAssertEqual(life.cancelRequested(), .none, "a second cancel changes nothing")
        XCTAssertEqual(life.executionFinished(.stopped), .markCancelled)
    }

    func testCancel_whenStagesFinishBeforeCheckpoint_resultStands() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = life.cancelRequested()
        XCTAssertEqual(life.executionFinished(.succeeded), .markSucceeded)
    }

    func testCancel_whenStageFailedTransiently_marksCancelledNotRetry() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = life.cancelRequested()
        XCTAssertEqual(life.executionFinished(.transientFailure("x")), .markCancelled)
    }

    func testShutdown_releasesWithoutBurningAttempt() {
        var life = JobLifecycle(attemptsUsed: 3, maxAttempts: 3)
        XCTAssertEqual(life.shutdownRequested(), .interrupt(.shutdown))
        XCTAssertEqual(life.executionFinished(.stopped), .release)
    }

    func testShutdown_thenCancel_cancelWins() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = life.shutdownRequested()
        XCTAssertEqual(life.cancelRequested(), .interrupt(.cancelled))
        XCTAssertEqual(life.executionFinished(.stopped), .markCancelled)
    }

    func testCancel_thenShutdown_cancelStands() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = life.cancelRequested()
        XCTAssertEqual(life.shutdownRequested(), .none)
        XCTAssertEqual(life.executionFinished(.stopped), .markCancelled)
    }

    func testTimeout_failsWithTimeoutMessage() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        XCTAssertEqual(life.timeoutReached(seconds: 5400), .interrupt(.timedOut(seconds: 5400)))
        let action = life.executionFinished(.stopped)
        XCTAssertEqual(action, .markFailed("timed out after 1 h 30 min (the job's timeout)", kind: .timedOut))
        XCTAssertEqual(action.outcome, .timedOut, "the outcome is carried as an enum, not read off the message")
    }

    func testTimeout_duringAWait_namesWhatTheJobWaitedFor() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = life.timeoutReached(seconds: 2)
        let action = life.executionFinished(.stopped, stoppedWhile: "waiting for the LLM endpoint http://llm:8000/v1 to describe class 'cat'")
        XCTAssertEqual(action, .markFailed("timed out after 2 s (the job's timeout) while waiting for the LLM endpoint http://llm:8000/v1 to describe class 'cat'", kind: .timedOut))
        var cancelled = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = cancelled.cancelRequested()
        XCTAssertEqual(cancelled.executionFinished(.stopped, stoppedWhile: "waiting"), .markCancelled, "only a timeout's message says it")
    }

    func testLeaseLost_overridesEverything_andWritesNothing() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = life.cancelRequested()
        XCTAssertEqual(life.leaseLost(), .interrupt(.leaseLost))
        XCTAssertEqual(life.cancelRequested(), .none)
        XCTAssertEqual(life.executionFinished(.succeeded), .abandon)
    }

    func testEventsAfterFinish_areIgnored() {
        var life = JobLifecycle(attemptsUsed: 1, maxAttempts: 3)
        _ = life.executionFinished(.succeeded)
        XCTAssertEqual(life.cancelRequested(), .none)
        XCTAssertEqual(life.shutdownRequested(), .none)
        XCTAssertEqual(life.leaseLost(), .none)
    }

    func testRetryPolicy_doublesUpToMaximum_withJitterBelow() {
        let p = RetryPolicy(base: 2, maximum: 60, jitter: 0.25)
        XCTAssertEqual(p.delay(failures: 1, unit: 0), 2)
        XCTAssertEqual(p.delay(failures: 2, unit: 0), 4)
        XCTAssertEqual(p.delay(failures: 5, unit: 0), 32)
        XCTAssertEqual(p.delay(failures: 6, unit: 0), 60)
        XCTAssertEqual(p.delay(failures: 40, unit: 0), 60)
        XCTAssertEqual(p.delay(failures: 3, unit: 0.999), 8 * (1 - 0.25 * 0.999), accuracy: 1e-12)
    }

    func testFormatSeconds() {
        XCTAssertEqual(formatSeconds(1), "1 s")
        XCTAssertEqual(formatSeconds(2.5), "2.5 s")
        XCTAssertEqual(formatSeconds(600), "10 min")
        XCTAssertEqual(formatSeconds(86400), "24 h")
    }
}

final class SHA256Tests: XCTestCase {
    // FIPS 180-4 example vectors (NIST CSRC "SHA256.pdf", "SHA2_Additional.pdf").
    func testKnownVectors() {
        let cases: [(String, String)] = [
            ("", "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            ("abc", "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"),
            ("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"),
            ("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu",
             "cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1"),
        ]
        for (message, digest) in cases {
            XCTAssertEqual(SHA256.hex(SHA256.hash(Array(message.utf8))), digest, "\"\(message)\"")
        }
        // 1,000,000 × "a".
        var h = SHA256()
        let chunk = [UInt8](repeating: 0x61, count: 1000)
        for _ in 0..<1000 { h.update(chunk) }
        XCTAssertEqual(SHA256.hex(h.finalize()), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0")
    }

    func testStreaming_inOddChunks_equalsOneShot() {
        let data = (0..<10_000).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
        var h = SHA256()
        var i = 0, step = 1
        while i < data.count {
            let end = min(data.count, i + step)
            h.update(Array(data[i..<end]))
            i = end
            step = step * 3 % 97 + 1
        }
        XCTAssertEqual(h.finalize(), SHA256.hash(data))
        // Lengths around the padding boundary (55, 56, 63, 64, 65 bytes) differ from each other.
        let digests = Set([55, 56, 63, 64, 65].map { SHA256.hex(SHA256.hash([UInt8](repeating: 0, count: $0))) })
        XCTAssertEqual(digests.count, 5)
    }
}

final class PostgresFormatTests: XCTestCase {
    func testTextArray_bindAndParse_roundTrip_withQuotesAndBackslashes() {
        let values = ["cat", "big dog", "say \"hi\"", "back\\slash", "comma,here", "{braces}", ""]
        guard case .text(let literal) = values.postgresValue else { return XCTFail("not text") }
        XCTAssertEqual(literal, #"{"cat","big dog","say \"hi\"","back\\slash","comma,here","{braces}",""}"#)
        XCTAssertEqual(parseTextArray(literal), values)
        XCTAssertEqual(parseTextArray("{a,b,c}"), ["a", "b", "c"])
        XCTAssertEqual(parseTextArray("{}"), [])
        XCTAssertNil(parseTextArray("a,b"))
    }

    func testHexDecoding() {
        XCTAssertEqual(decodeHex("00ff10Ab"), [0, 255, 16, 171])
        XCTAssertNil(decodeHex("abc"))
        XCTAssertNil(decodeHex("zz"))
    }

    func testErrors_transientOnlyForConnectionAndServerStates() {
        XCTAssertTrue(DatabaseError(.connectionLost, "x").isTransient)
        XCTAssertTrue(DatabaseError(.statementFailed, "x", sqlState: "57P01").isTransient)
        XCTAssertTrue(DatabaseError(.statementFailed, "x", sqlState: "40001").isTransient)
        XCTAssertFalse(DatabaseError(.statementFailed, "x", sqlState: "23514").isTransient)
        XCTAssertFalse(DatabaseError(.statementFailed, "x", sqlState: "42501").isTransient)
        // lock_timeout and statement_timeout (database_timeout's bounds) are worth another try.
        XCTAssertTrue(DatabaseError(.statementFailed, "x", sqlState: "55P03").isTransient)
        XCTAssertTrue(DatabaseError(.statementFailed, "x", sqlState: "57014").isTransient)
        XCTAssertTrue(DatabaseError(.statementFailed, "x", sqlState: "55P03").isTimeout)
        XCTAssertFalse(DatabaseError(.statementFailed, "x", sqlState: "40001").isTimeout)
        XCTAssertEqual(DatabaseError(.statementFailed, "duplicate class name", sqlState: "23514").description,
                       "database error 23514: duplicate class name")
    }

    func testJSONValue_compactSortedText() {
        let v: JSONValue = ["b": 1, "a": [1.5, "x", true, .null], "path": "/a/b"]
        XCTAssertEqual(v.jsonText, #"{"a":[1.5,"x",true,null],"b":1,"path":"/a/b"}"#)
    }

    func testMigrationFiles_areNumberedFromOne_andMatchExpectedVersion() throws {
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Migrations")
        let migrations = try Migrator.load(from: dir)
        XCTAssertEqual(migrations.map(\.version), Array(1...Migrator.expectedVersion))
    }
}

final class ConfigTests: XCTestCase {
    func write(_ text: String) throws -> String {
        let path = NSTemporaryDirectory() + "nolad-config-\(UUID().uuidString).yaml"
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
        return path
    }

    func testExampleFile_parses_withDocumentedDefaults() throws {
        let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Config/nolad.example.yaml").path
        let c = try NoladConfig.load(path: example, environment: [:])
        XCTAssertEqual(c.concurrency, 1)
        XCTAssertEqual(c.collectionRoots, ["/srv/nolad/collections"])
        XCTAssertEqual(c.conninfo, "host=/run/postgresql dbname=nolad user=nolad application_name=nolad")
        XCTAssertEqual(c.clipModel, "/var/lib/nolad/models/clip-vit-base-patch32")
    }

    func testYaml_thenEnvironmentOverrides() throws {
        let path = try write("""
            database_host: /run/postgresql
            database_name: pets
            worker_name: gpu-less-1
            collection_roots:
              - /data/a
              - /data/b
            lease_seconds: 2
            heartbeat_seconds: 0.5
            threads: 4
            """)
        var c = try NoladConfig.load(path: path, environment: [:])
        XCTAssertEqual(c.collectionRoots, ["/data/a", "/data/b"])
        XCTAssertEqual(c.leaseSeconds, 2)
        XCTAssertEqual(c.heartbeatSeconds, 0.5)
        XCTAssertEqual(c.threads, 4)
        XCTAssertEqual(c.conninfo, "host='/run/postgresql' dbname='pets' application_name=nolad")

        c = try NoladConfig.load(path: path, environment: [
            "NOLAD_COLLECTION_ROOTS": "/x:/y", "NOLAD_THREADS": "8", "NOLAD_DATABASE": "postgresql:///other",
            "NOLAD_HEARTBEAT_SECONDS": "0.25", "NOLAD_WORKER_NAME": "w2",
        ])
        XCTAssertEqual(c.collectionRoots, ["/x", "/y"])
        XCTAssertEqual(c.threads, 8)
        XCTAssertEqual(c.heartbeatSeconds, 0.25)
        XCTAssertEqual(c.workerName, "w2")
        XCTAssertEqual(c.conninfo, "postgresql:///other")
    }

    func testConfigFile_fromNOLAD_CONFIG() throws {
        let path = try write("concurrency: 3\n")
        XCTAssertEqual(try NoladConfig.load(path: nil, environment: ["NOLAD_CONFIG": path]).concurrency, 3)
    }

    func testConninfo_quotesValues() {
        var c = NoladConfig()
        c.databaseHost = "/run/postgresql"
        c.databaseName = "it's"
        c.databasePort = 5433
        XCTAssertEqual(c.conninfo, #"host='/run/postgresql' port=5433 dbname='it\'s' application_name=nolad"#)
    }

    func testBadConfigs_failWithMessagesNamingTheKey() throws {
        let cases: [(String, [String: String], String)] = [
            ("lease_secs: 3\n", [:], "unknown key \"lease_secs\""),
            ("threads: many\n", [:], "threads must be an integer, got \"many\""),
            ("", ["NOLAD_LEASE_SECONDS": "soon"], "NOLAD_LEASE_SECONDS: lease_seconds must be a number of seconds, got \"soon\""),
            ("lease_seconds: 1\nheartbeat_seconds: 2\n", [:], "heartbeat_seconds must be positive and shorter than lease_seconds"),
            ("collection_roots: [relative/path]\n", [:], "collection root relative/path must be an absolute path"),
            ("concurrency: 0\n", [:], "concurrency must be at least 1"),
            ("- a\n- b\n", [:], "must be a mapping"),
            ("a: [\n", [:], "is not valid YAML"),
        ]
        for (yaml, env, message) in cases {
            let path = try write(yaml)
            XCTAssertThrowsError(try NoladConfig.load(path: path, environment: env), yaml) { error in
                XCTAssertTrue("\(error)".contains(message), "expected \(message), got \(error)")
            }
        }
        XCTAssertThrowsError(try NoladConfig.load(path: "/nonexistent/nolad.yaml", environment: [:])) { error in
            XCTAssertEqual("\(error)", "cannot read the configuration file /nonexistent/nolad.yaml")
        }
    }
}

/// database_timeout and the bounds derived from it (docs/operations.md, "Network partitions").
final class DatabaseTimeoutTests: XCTestCase {
    func testDefault_isFiveSeconds_orAThirdOfWhatTheLeaseLeaves() throws {
        XCTAssertEqual(try NoladConfig.load(path: nil, environment: [:]).databaseTimeout, 5)
        var c = try NoladConfig.load(path: nil, environment: ["NOLAD_LEASE_SECONDS": "2", "NOLAD_HEARTBEAT_SECONDS": "0.5"])
        XCTAssertEqual(c.databaseTimeout, 0.5, accuracy: 1e-9)
        c = try NoladConfig.load(path: nil, environment: ["NOLAD_DATABASE_TIMEOUT": "2.5"])
        XCTAssertEqual(c.databaseTimeout, 2.5)
        XCTAssertEqual(c.controlConnectionLimits, .control(timeout: 2.5))
        XCTAssertEqual(c.jobConnectionLimits, .job(timeout: 2.5))
    }

    func testTooLongOrNotPositive_isRefusedWithASentence() {
        let cases: [([String: String], String)] = [
            (["NOLAD_DATABASE_TIMEOUT": "0"], "database_timeout must be a positive number of seconds"),
            (["NOLAD_DATABASE_TIMEOUT": "soon"], "database_timeout must be a number of seconds, got \"soon\""),
            (["NOLAD_DATABASE_TIMEOUT": "25"], "database_timeout (25.0 s) is too long for lease_seconds (60.0) and heartbeat_seconds (10.0): a dead connection is noticed within 2 × database_timeout, which must end before the lease does (heartbeat_seconds + 2 × database_timeout < lease_seconds)"),
        ]
        for (env, message) in cases {
            XCTAssertThrowsError(try NoladConfig.load(path: nil, environment: env)) { error in
                XCTAssertTrue("\(error)".contains(message), "expected \(message), got \(error)")
            }
        }
    }

    func testBounds_derivedFromOneValue() {
        let control = ConnectionLimits.control(timeout: 5)
        XCTAssertEqual(control.connectSeconds, 5)
        XCTAssertEqual(control.silenceSeconds, 10)
        XCTAssertEqual(control.statementSeconds, 5)
        XCTAssertEqual(control.lockSeconds, 5)
        XCTAssertEqual(control.idleInTransactionSeconds, 10)
        XCTAssertEqual([control.keepalivesIdle, control.keepalivesInterval, control.keepalivesCount], [5, 2, 3])
        XCTAssertEqual(control.tcpUserTimeoutMilliseconds, 10_000)
        let job = ConnectionLimits.job(timeout: 5)
        XCTAssertEqual(job.statementSeconds, 60)
        XCTAssertEqual(job.lockSeconds, 5)
        XCTAssertEqual(job.silenceSeconds, 65)
        XCTAssertEqual(job.connectSeconds, 5)
        // Sub-second values: the integer TCP settings round up to at least 1 s.
        let small = ConnectionLimits.control(timeout: 0.4)
        XCTAssertEqual([small.keepalivesIdle, small.keepalivesInterval, small.keepalivesCount], [1, 1, 3])
        XCTAssertEqual(small.tcpUserTimeoutMilliseconds, 800)
        XCTAssertEqual(small.connectionParameters.first?.1, "1")
    }

    func testConnectionString_keepsWhatTheUserSet_addsTheRest() throws {
        let limits = ConnectionLimits.control(timeout: 5)
        let kv = try PostgresConnection.parameters(conninfo: "host=db.example dbname=q keepalives_idle=30 application_name=nolad", adding: limits)
        let dict = Dictionary(kv, uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(kv.filter { $0.0 == "keepalives_idle" }.map(\.1), ["30"], "the user's value, once")
        XCTAssertEqual(dict["host"], "db.example")
        XCTAssertEqual(dict["connect_timeout"], "5")
        XCTAssertEqual(dict["keepalives"], "1")
        XCTAssertEqual(dict["keepalives_interval"], "2")
        XCTAssertEqual(dict["keepalives_count"], "3")
        XCTAssertEqual(dict["tcp_user_timeout"], "10000")
        let uri = Dictionary(try PostgresConnection.parameters(conninfo: "postgresql://nolad@db.example:5433/q?tcp_user_timeout=250&connect_timeout=9", adding: limits),
                             uniquingKeysWith: { a, _ in a })
        XCTAssertEqual(uri["port"], "5433")
        XCTAssertEqual(uri["user"], "nolad")
        XCTAssertEqual(uri["tcp_user_timeout"], "250")
        XCTAssertEqual(uri["connect_timeout"], "9")
        XCTAssertEqual(uri["keepalives_idle"], "5")
        XCTAssertThrowsError(try PostgresConnection.parameters(conninfo: "host=x bogus_option=1", adding: limits)) { error in
            XCTAssertTrue("\(error)".contains("invalid connection string"), "\(error)")
        }
    }

    func testSessionSettings_skipWhatTheOptionsSet() {
        let limits = ConnectionLimits.control(timeout: 0.4)
        XCTAssertEqual(limits.sessionSettings(options: nil).map { "\($0.0)=\($0.1)" }, [
            "statement_timeout=400", "lock_timeout=400", "idle_in_transaction_session_timeout=800",
            "tcp_keepalives_idle=1", "tcp_keepalives_interval=1", "tcp_keepalives_count=3",
        ])
        XCTAssertEqual(limits.sessionSettings(options: "-c statement_timeout=0 -c lock_timeout=2s").map(\.0), [
            "idle_in_transaction_session_timeout", "tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count",
        ])
    }
}

final class CollectionTests: XCTestCase {
    var base = ""

    override func setUpWithError() throws {
        base = NSTemporaryDirectory() + "nolad-collection-\(UUID().uuidString)"
        let fm = FileManager.default
        try fm.createDirectory(atPath: base + "/root/pets/cats", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: base + "/outside", withIntermediateDirectories: true)
        try fm.createDirectory(atPath: base + "/root/empty", withIntermediateDirectories: true)
        fm.createFile(atPath: base + "/root/pets/cats/a.png", contents: Data([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 1, 2]))
        fm.createFile(atPath: base + "/root/pets/b.JPG.txt", contents: Data([0xFF, 0xD8, 0xFF, 0xDB, 9]))
        fm.createFile(atPath: base + "/root/pets/fake.jpg", contents: Data("not a jpeg".utf8))
        fm.createFile(atPath: base + "/outside/secret.jpg", contents: Data([0xFF, 0xD8, 0xFF, 0xE0]))
        try fm.createSymbolicLink(atPath: base + "/root/pets/escape", withDestinationPath: base + "/outside")
        try fm.createSymbolicLink(atPath: base + "/root/pets/loop", withDestinationPath: base + "/root/pets")
        try fm.createSymbolicLink(atPath: base + "/root/link-out", withDestinationPath: base + "/outside")
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(atPath: base)
    }

    func testResolve_statesMissingOutsideAndNotAFolder() throws {
        let roots = [base + "/root"]
        XCTAssertEqual(try CollectionAccess.resolve(base + "/root/pets", roots: roots).path, CollectionAccess.realPath(base + "/root/pets"))
        func message(_ path: String) -> String {
            do { _ = try CollectionAccess.resolve(path, roots: roots); return "accepted" } catch { return "\(error)" }
        }
        XCTAssertEqual(message(base + "/root/nope"), "collection folder \(base)/root/nope does not exist")
        XCTAssertEqual(message(base + "/outside"), "collection folder \(base)/outside is outside the configured collection roots (\(base)/root)")
        XCTAssertEqual(message(base + "/elsewhere/nope"), "collection folder \(base)/elsewhere/nope is outside the configured collection roots (\(base)/root)")
        XCTAssertTrue(message(base + "/root/link-out").hasPrefix("collection folder \(base)/root/link-out is outside the configured collection roots"))
        XCTAssertEqual(message(base + "/root/pets/cats/a.png"), "collection \(base)/root/pets/cats/a.png is not a folder")
        XCTAssertTrue(message(base + "/root/../outside").contains("is outside the configured collection roots"))
    }

    func testWalk_followsSymlinksOnlyInsideRoots_andSurvivesLoops() throws {
        let roots = CollectionAccess.resolveRoots([base + "/root"])
        let folder = try CollectionAccess.resolve(base + "/root/pets", roots: [base + "/root"])
        // Names that are not valid UTF-8 (Latin-1 "café.jpg", and a file in a Latin-1 "ré" folder) are
        // walked like any other: recorded under an escaped name, with their exact bytes.
        let latin1: [UInt8] = Array((base + "/root/pets/cats/caf").utf8) + [0xE9] + Array(".jpg".utf8)
        let folderName: [UInt8] = Array((base + "/root/pets/r").utf8) + [0xE9]
        func cPath(_ bytes: [UInt8]) -> [CChar] { bytes.map { CChar(bitPattern: $0) } + [0] }
        XCTAssertEqual(mkdir(cPath(folderName), 0o755), 0)
        for file in [latin1, folderName + Array("/x.png".utf8)] {
            let fd = open(cPath(file), O_CREAT | O_WRONLY, 0o644)
            XCTAssertGreaterThanOrEqual(fd, 0)
            close(fd)
        }
        let walk = CollectionAccess.walk(folder, roots: roots)
        XCTAssertEqual(walk.files.map(\.relativePath), ["b.JPG.txt", "cats/a.png", "cats/caf\\xE9.jpg", "fake.jpg", "r\\xE9/x.png"])
        XCTAssertEqual(walk.skippedOutsideRoots, 1, "the link to the outside folder is skipped")
        XCTAssertEqual(walk.undecodableNames, ["cats/caf\\xE9.jpg", "r\\xE9/x.png"])
        let cafe = try XCTUnwrap(walk.files.first { $0.relativePath == "cats/caf\\xE9.jpg" })
        XCTAssertEqual(cafe.relativeBytes, Array("cats/caf".utf8) + [0xE9] + Array(".jpg".utf8), "the exact bytes are kept")
        XCTAssertEqual(cafe.file.pathBytes.suffix(latin1.count - base.utf8.count), latin1.suffix(latin1.count - base.utf8.count))
        XCTAssertNil(walk.files.first { $0.relativePath == "cats/a.png" }?.relativeBytes)
        XCTAssertNoThrow(try CollectionAccess.inspect(cafe.file, imageByName: true), "the file opens by its bytes")
        XCTAssertEqual(ImageFile.escaped(Array("été".utf8) + [0xFF, 0xC3]), "été\\xFF\\xC3", "valid UTF-8 kept, each bad byte escaped")
    }

    func testInspect_recognisesImagesByMagicBytesNotExtension() throws {
        let png = try CollectionAccess.inspect(base + "/root/pets/cats/a.png")
        XCTAssertEqual(png.format, "png")
        XCTAssertEqual(png.size, 10)
        XCTAssertEqual(png.sha256, SHA256.hex(SHA256.hash([0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 1, 2])))
        XCTAssertEqual(try CollectionAccess.inspect(base + "/root/pets/b.JPG.txt").format, "jpeg")
        XCTAssertNil(try CollectionAccess.inspect(base + "/root/pets/fake.jpg").format)
        // Named like an image, it is one (the decoder then says why it is unreadable); so is a zero-byte .jpg.
        XCTAssertEqual(try CollectionAccess.inspect(base + "/root/pets/fake.jpg", imageByName: true).format, "jpeg")
        FileManager.default.createFile(atPath: base + "/root/pets/empty.jpg", contents: Data())
        let empty = try CollectionAccess.inspect(base + "/root/pets/empty.jpg", imageByName: true)
        XCTAssertEqual(empty.format, "jpeg")
        XCTAssertEqual(empty.size, 0)
        XCTAssertEqual(empty.sha256, SHA256.hex(SHA256.hash([])))
        XCTAssertTrue(CollectionAccess.hasImageExtension("x/A.JPEG") && !CollectionAccess.hasImageExtension("b.JPG.txt"))
        XCTAssertThrowsError(try CollectionAccess.inspect(base + "/root/pets/missing.jpg"))
    }

    func testLabelsCSV_quotesPerRFC4180() {
        let rows = PostgresRows(columns: ["path", "label"], values: [["a,b.jpg", "say \"x\""], ["c.jpg", nil]], affected: 0)
        XCTAssertEqual(LabelsCommand.csv(rows), "path,label\n\"a,b.jpg\",\"say \"\"x\"\"\"\nc.jpg,\n")
    }
}

final class ModelIdentityTests: XCTestCase {
    /// A sharded checkpoint's identity covers its index and every shard; a single file keeps its own hash.
    func testShardedCheckpoint_identityHashesTheIndexAndEveryShard() throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("ModelsTests/Fixtures/checkpoints")
        let sharded = fixtures.appendingPathComponent("sharded")
        XCTAssertEqual(weightsFiles(folder: sharded).map(\.lastPathComponent),
                       ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
        let identity = try ModelIdentity.of(folder: sharded)
        XCTAssertEqual(identity.weightsSHA256.count, 64)
        let single = fixtures.appendingPathComponent("good")
        let files = weightsFiles(folder: single)
        XCTAssertEqual(files.count, 1)
        XCTAssertEqual(try ModelIdentity.of(folder: single).weightsSHA256, try CollectionAccess.inspectAnyFile(files[0].path))
        XCTAssertThrowsError(try ModelIdentity.of(folder: fixtures.appendingPathComponent("no-such-folder")))
    }
}
