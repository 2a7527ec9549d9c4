// DatabaseTests — the SQL interface and the worker daemon against a real PostgreSQL (see TestCluster.swift).
import Daemon
import Foundation
import Queue
import XCTest

final class MigrationTests: DatabaseTestCase {
    func testMigrate_fromEmpty_matchesExpectedSchema_andSecondRunChangesNothing() throws {
        // setUp migrated this database once; a second database migrated from empty must look the same.
        let fresh = try cluster.createDatabase(prefix: "fresh")
        let c = try PostgresConnection(conninfo: cluster.conninfo(fresh))
        XCTAssertEqual(try Migrator.currentVersion(c), 0)
        let applied = try Migrator.migrate(c, migrations: try Migrator.load(from: migrationsDirectory))
        XCTAssertEqual(applied, Array(1...Migrator.expectedVersion))
        XCTAssertEqual(try Migrator.currentVersion(c), Migrator.expectedVersion)

        // Exactly the relations and columns the code expects, no more, no fewer.
        let columns = try SchemaCatalog.columns(c)
        XCTAssertEqual(Set(columns.keys), Set(SchemaCatalog.expected.keys))
        for (relation, expected) in SchemaCatalog.expected {
            XCTAssertEqual(columns[relation], expected, "columns of nola.\(relation)")
        }
        XCTAssertNoThrow(try Migrator.checkSchema(c))

        let before = try SchemaCatalog.fingerprint(c)
        XCTAssertGreaterThan(before.count, 100)
        XCTAssertEqual(before, try SchemaCatalog.fingerprint(db), "two databases migrated from empty differ")
        let again = try Migrator.migrate(c, migrations: try Migrator.load(from: migrationsDirectory))
        XCTAssertEqual(again, [], "second run applied something")
        XCTAssertEqual(try SchemaCatalog.fingerprint(c), before, "second run changed the schema")

        // The CLI does the same and says so.
        let (status, output) = try runProgram(try noladExecutable(), ["migrate", "--database", cluster.conninfo(fresh)])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("schema is up to date (version \(Migrator.expectedVersion))"), output)
    }

    func testServe_refusesSchemaOlderOrNewer_namingTheCommand() throws {
        let empty = try cluster.createDatabase(prefix: "unmigrated")
        var env = ProcessInfo.processInfo.environment
        env["NOLAD_DATABASE"] = cluster.conninfo(empty)
        env["NOLAD_COLLECTION_ROOTS"] = root
        var (status, output) = try runProgram(try noladExecutable(), ["serve"], environment: env)
        XCTAssertEqual(status, 1, output)
        XCTAssertTrue(output.contains("needs \(Migrator.expectedVersion); run `nolad migrate`"), output)

        try db.query("INSERT INTO nola.schema_migrations (version, name, checksum) VALUES (99, 'future', 'x')")
        env["NOLAD_DATABASE"] = conninfo
        (status, output) = try runProgram(try noladExecutable(), ["serve"], environment: env)
        XCTAssertEqual(status, 1, output)
        XCTAssertTrue(output.contains("version 99, newer than this nolad knows (\(Migrator.expectedVersion)); upgrade nolad"), output)
    }
}

final class SubmissionTests: DatabaseTestCase {
    func testInsert_badSubmissions_rejectedWithStatedMessages() throws {
        let cases: [(String, [PostgresBindable?], String)] = [
            ("INSERT INTO nola.jobs (collection, classes) VALUES ('/data/x', $1)", [[String]()], "classes must not be empty"),
            ("INSERT INTO nola.jobs (collection, classes) VALUES ('/data/x', $1)", [["cat", "dog", "Cat"]], "duplicate class name \"Cat\""),
            ("INSERT INTO nola.jobs (collection, classes) VALUES ('/data/x', $1)", [["cat", " "]], "class names must not be empty"),
            ("INSERT INTO nola.jobs (collection, classes) VALUES ('data/x', $1)", [["cat"]], "collection must be an absolute path (starting with /), got \"data/x\""),
            ("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/data/x', $1, '[1]')", [["cat"]], "parameters must be a JSON object, got [1]"),
            ("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/data/x', $1, '{\"epochz\": 3}')", [["cat"]], "unknown parameter \"epochz\""),
            ("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/data/x', $1, '{\"seed\": \"7\"}')", [["cat"]], "parameter \"seed\" must be an integer at least 0, got \"7\""),
            ("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/data/x', $1, '{\"prompt_lr\": true}')", [["cat"]], "parameter \"prompt_lr\" must be a number greater than 0 and at most 1, got true"),
            ("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/data/x', $1, '{\"min_k\": -3}')", [["cat"]], "parameter \"min_k\" must be an integer from 1 to 1000000, got -3"),
            ("INSERT INTO nola.jobs (collection, classes, descriptions) VALUES ('/data/x', $1, '{\"bird\": [\"a bird\"]}')", [["cat"]], "descriptions name class \"bird\", which is not in classes"),
            ("INSERT INTO nola.jobs (collection, classes, descriptions) VALUES ('/data/x', $1, '{\"cat\": \"a cat\"}')", [["cat"]], "descriptions of class \"cat\" must be an array of strings"),
            ("INSERT INTO nola.jobs (collection, classes, max_attempts) VALUES ('/data/x', $1, 0)", [["cat"]], "max_attempts must be an integer from 1 to 100, got 0"),
            ("INSERT INTO nola.jobs (collection, classes, timeout) VALUES ('/data/x', $1, '-1 hour')", [["cat"]], "timeout must be a positive interval such as '2 hours', got '-01:00:00'"),
        ]
        for (sql, params, message) in cases {
            do {
                try db.query(sql, params)
                XCTFail("accepted: \(sql) \(params)")
            } catch let e as DatabaseError {
                XCTAssertEqual(e.sqlState, "23514", "\(e)")
                XCTAssertTrue(e.message.contains(message), "expected \(message), got \(e)")
            }
        }
        // A good one with every optional column.
        let id = try db.query("""
            INSERT INTO nola.jobs (collection, classes, descriptions, parameters, priority, run_after, max_attempts, timeout)
            VALUES ('/data/pets', '{cat,dog}', '{"cat": ["a small furry pet"]}', '{"seed": 1, "templates": true}',
                    5, now(), 2, '10 minutes') RETURNING id
            """)
        XCTAssertEqual(id.count, 1)
    }

    func testSubmitterRole_insertsAndCancels_butCannotChangeDaemonColumns() throws {
        let user = "submitter_\(dbname)"
        try db.query("DROP ROLE IF EXISTS \(user)")
        try db.query("CREATE ROLE \(user) LOGIN IN ROLE nola_submitter")
        let c = try PostgresConnection(conninfo: conninfo.replacingOccurrences(of: "user=postgres", with: "user=\(user)"))
        let id = try c.query("INSERT INTO nola.jobs (collection, classes) VALUES ('/data/x', '{a,b}') RETURNING id")[0].int("id")
        XCTAssertEqual(try c.query("SELECT state::text AS s FROM nola.job_status WHERE id = $1", [id])[0].string("s"), "queued")
        for sql in ["UPDATE nola.jobs SET state = 'succeeded' WHERE id = $1", "UPDATE nola.jobs SET worker = 'me' WHERE id = $1",
                    "DELETE FROM nola.jobs WHERE id = $1"] {
            XCTAssertThrowsError(try c.query(sql, [id])) { error in
                XCTAssertEqual((error as? DatabaseError)?.sqlState, "42501", "\(sql): \(error)") // insufficient_privilege
            }
        }
        XCTAssertThrowsError(try c.query("INSERT INTO nola.jobs (collection, classes, state) VALUES ('/x', '{a}', 'running')"))
        XCTAssertEqual(try c.query("SELECT nola.cancel($1)::text AS s", [id])[0].string("s"), "cancelled")
        XCTAssertEqual(try job(Int64(id)).string("state"), "cancelled")
        c.close()
        try db.query("DROP OWNED BY \(user)")
        try db.query("DROP ROLE \(user)")
    }

    func testResults_labelsAndPrompts_roundTrip_andLabelsCommandExports() throws {
        let collection = try makeCollection("pets", images: 3)
        let id = try submit(collection)
        guard let claimed = try JobStore.claim(db, worker: "test-worker", leaseSeconds: 30) else { return XCTFail("nothing claimed") }
        XCTAssertEqual(claimed.ref.id, id)
        XCTAssertEqual(claimed.classes, ["cat", "dog"])
        let images = (0..<3).map { ImageRecord(path: "img00\($0).jpg", sizeBytes: 10, sha256: String(repeating: "ab", count: 32), format: "jpeg") }
        XCTAssertTrue(try Results.insertImages(db, claimed.ref, images))
        XCTAssertTrue(try Results.insertImages(db, claimed.ref, images), "upsert twice")
        XCTAssertEqual(try Results.images(db, jobID: id), images)
        XCTAssertTrue(try Results.insertLabels(db, claimed.ref, [
            LabelRecord(path: "img000.jpg", label: "cat", abstained: nil, confidence: 0.875, zeroShotLabel: "dog", zeroShotConfidence: 0.5,
                        topLabels: ["cat", "dog, \"big\""], topProbabilities: [0.875, 0.125], margin: 0.75, teacherLabel: "cat", agreement: false),
            LabelRecord(path: "img001.jpg", label: "dog, \"big\"", confidence: 1, zeroShotLabel: "dog", zeroShotConfidence: 0.25),
            LabelRecord(path: "img002.jpg", unreadable: "truncated JPEG"),
        ]))
        let blob: [UInt8] = (0..<1000).map { UInt8($0 % 251) }
        XCTAssertTrue(try Results.savePrompts(db, claimed.ref, safetensors: blob, shapes: ["prompts": [16, 768]],
                                              backbone: ["clip": "openai/clip-vit-base-patch32"], parameters: ["seed": 1]))
        XCTAssertEqual(try db.query("SELECT safetensors FROM nola.prompts WHERE job_id = $1", [id])[0].bytes("safetensors"), blob)
        try Results.cacheDescriptions(db, className: "cat", model: "m", promptVersion: "v1", sentences: ["a cat", "whiskers"])
        XCTAssertEqual(try Results.cachedDescriptions(db, className: "cat", model: "m", promptVersion: "v1"), ["a cat", "whiskers"])
        XCTAssertNil(try Results.cachedDescriptions(db, className: "cat", model: "m", promptVersion: "v2"))

        // Another worker's writes are refused by the guard.
        let stranger = JobRef(id: id, attempt: claimed.ref.attempt, worker: "someone-else")
        XCTAssertFalse(try Results.insertImages(db, stranger, images))
        XCTAssertFalse(try JobStore.finish(db, stranger, .markSucceeded))
        XCTAssertTrue(try JobStore.finish(db, claimed.ref, .markSucceeded))
        XCTAssertFalse(try JobStore.finish(db, claimed.ref, .markSucceeded), "a second final write must find nothing")

        let exe = try noladExecutable()
        let (status, csv) = try runProgram(exe, ["labels", String(id), "--database", conninfo])
        XCTAssertEqual(status, 0, csv)
        XCTAssertEqual(csv, #"""
            path,label,confidence,zero_shot_label,zero_shot_confidence,unreadable,abstained,margin,teacher_label,agreement,top_labels,top_probabilities
            img000.jpg,cat,0.875,dog,0.5,,,0.75,cat,false,"[""cat"", ""dog, \""big\""""]","[0.875, 0.125]"
            img001.jpg,"dog, ""big""",1,dog,0.25,,,,,,,
            img002.jpg,,,,,truncated JPEG,,,,,,

            """#)
        let (status2, jsonl) = try runProgram(exe, ["labels", String(id), "--format", "jsonl", "--database", conninfo])
        XCTAssertEqual(status2, 0, jsonl)
        XCTAssertEqual(jsonl.split(separator: "\n").first, #"{"abstained":null,"agreement":false,"confidence":0.875,"label":"cat","margin":0.75,"path":"img000.jpg","teacher_label":"cat","top_labels":["cat","dog, \"big\""],"top_probabilities":[0.875,0.125],"unreadable":null,"zero_shot_confidence":0.5,"zero_shot_label":"dog"}"#)
    }
}

final class DaemonTests: DatabaseTestCase {
    func testBadCollections_failWithStatedMessages_andDaemonKeepsServing() throws {
        let outside = root + "-outside"
        try FileManager.default.createDirectory(atPath: outside, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: outside) }
        FileManager.default.createFile(atPath: outside + "/a.jpg", contents: Data([0xFF, 0xD8, 0xFF, 0xE0]))
        try FileManager.default.createDirectory(atPath: root + "/empty", withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: root + "/empty/notes.txt", contents: Data("not an image".utf8))
        try FileManager.default.createSymbolicLink(atPath: root + "/sneaky", withDestinationPath: outside)

        _ = try startDaemon("a")
        let missing = try submit(root + "/missing")
        let empty = try submit(root + "/empty")
        let out = try submit(outside)
        let viaLink = try submit(root + "/sneaky")
        let good = try submit(try makeCollection("good", images: 4))

        let expected: [(Int64, String)] = [
            (missing, "collection folder \(root)/missing does not exist"),
            (empty, "collection folder \(root)/empty contains no JPEG or PNG images"),
            (out, "collection folder \(outside) is outside the configured collection roots (\(root))"),
            (viaLink, "collection folder \(root)/sneaky is outside the configured collection roots (\(root)) (it resolves to \(outside))"),
        ]
        for (id, message) in expected {
            let row = try waitState(id, ["failed", "succeeded"], timeout: 15)
            XCTAssertEqual(try row.string("state"), "failed")
            XCTAssertEqual(try row.optionalString("error"), message)
            XCTAssertEqual(try row.int("attempt"), 1, "bad input must not be retried")
        }
        XCTAssertEqual(try waitState(good, ["failed", "succeeded"], timeout: 15).string("state"), "succeeded")
        XCTAssertEqual(try Results.images(db, jobID: good).count, 4)
        XCTAssertTrue(daemons[0].process.isRunning, "the daemon must keep serving")
    }

    func testPlainInsert_wakesIdleDaemon_withinOneSecond() throws {
        // Polling and heartbeats far apart, so only the NOTIFY can wake it in time.
        _ = try startDaemon("idle", settings: ["poll_seconds": "30", "heartbeat_seconds": "20", "lease_seconds": "60"])
        let collection = try makeCollection("wake", images: 1)
        Thread.sleep(forTimeInterval: 0.5) // let it settle into its wait
        let start = Date()
        let id = try submit(collection)
        try waitUntil("job is claimed", timeout: 10, poll: 0.01) { try job(id).string("state") != "queued" }
        let latency = Date().timeIntervalSince(start)
        print("insert → claimed latency: \(String(format: "%.3f", latency)) s")
        XCTAssertLessThan(latency, 1.0)
    }

    func testTwoDaemons_fiftyJobs_everyJobDoneExactlyOnce() throws {
        let collection = try makeCollection("many", images: 3)
        var ids: [Int64] = []
        for _ in 0..<50 { ids.append(try submit(collection)) }
        _ = try startDaemon("one", settings: ["concurrency": "2", "image_delay_seconds": "0.01"])
        _ = try startDaemon("two", settings: ["concurrency": "2", "image_delay_seconds": "0.01"])
        try waitUntil("all 50 jobs ended", timeout: 90, poll: 0.1) {
            try db.query("SELECT count(*) AS n FROM nola.jobs WHERE state IN ('queued', 'running')")[0].int("n") == 0
        }
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.jobs WHERE state = 'succeeded'")[0].int("n"), 50)
        let attempts = try db.query("SELECT job_id, count(*) AS n, max(attempt) AS a FROM nola.attempts GROUP BY job_id")
        XCTAssertEqual(attempts.count, 50, "every job has attempts")
        for row in attempts.rows {
            let jobID = try row.int("job_id")
            XCTAssertEqual(try row.int("n"), 1, "job \(jobID) ran more than once")
            XCTAssertEqual(try row.int("a"), 1)
        }
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.events WHERE kind = 'claimed'")[0].int("n"), 50)
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.images")[0].int("n"), 150)
        let split = try db.query("SELECT split_part(worker, '-', 1) AS w, count(*) AS n FROM nola.jobs GROUP BY 1 ORDER BY 1")
        print("jobs per daemon: \(split.values)")
    }

    /// A heartbeat renewing a lease while the job's thread writes `succeeded` used to find the row gone
    /// and log "lease lost" after a normal success. With a heartbeat every 20 ms the race is frequent.
    func testHeartbeatRacingTheFinalWrite_logsNoLeaseLoss() throws {
        let collection = try makeCollection("race", images: 1)
        var ids: [Int64] = []
        for _ in 0..<40 { ids.append(try submit(collection)) }
        let d = try startDaemon("racer", settings: ["concurrency": "4", "heartbeat_seconds": "0.02"])
        try waitUntil("all 40 jobs ended", timeout: 90, poll: 0.1) {
            try db.query("SELECT count(*) AS n FROM nola.jobs WHERE state IN ('queued', 'running')")[0].int("n") == 0
        }
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.jobs WHERE state = 'succeeded'")[0].int("n"), 40)
        XCTAssertFalse(d.log.contains("lease lost"), d.log)
    }

    func testKill9MidJob_anotherDaemonResumesAfterLeaseExpires_attemptsShowBoth() throws {
        let id = try submit(try makeCollection("slow", images: 30), maxAttempts: 3)
        let a = try startDaemon("doomed", settings: ["image_delay_seconds": "0.1"])
        try waitUntil("job runs on the first daemon", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 2 }
        let b = try startDaemon("rescuer", settings: ["image_delay_seconds": "0.005"])
        a.signal(SIGKILL)
        XCTAssertNotNil(a.waitExit(timeout: 5))
        let killedAt = Date()
        let killedAtDB = try db.query("SELECT now()::text AS t")[0].string("t")
        let row = try waitState(id, ["succeeded", "failed"], timeout: 30)
        print("kill -9 → succeeded on the other daemon after \(String(format: "%.2f", Date().timeIntervalSince(killedAt))) s (lease 2 s)")
        XCTAssertEqual(try row.string("state"), "succeeded")
        XCTAssertEqual(try row.int("attempt"), 2)
        let attempts = try db.query("SELECT attempt, worker, outcome, error FROM nola.attempts WHERE job_id = $1 ORDER BY attempt", [id])
        XCTAssertEqual(attempts.count, 2)
        XCTAssertTrue(try attempts[0].string("worker").hasPrefix("doomed-"))
        XCTAssertEqual(try attempts[0].string("outcome"), "lost")
        XCTAssertTrue(try attempts[0].string("error").hasPrefix("lease expired"))
        XCTAssertTrue(try attempts[1].string("worker").hasPrefix("rescuer-"))
        XCTAssertEqual(try attempts[1].string("outcome"), "succeeded")
        // Not before the lease (2 s, renewed every 0.5 s) ran out.
        let gap = try db.query("SELECT extract(epoch FROM started_at - $2::timestamptz)::float8 AS gap FROM nola.attempts WHERE job_id = $1 AND attempt = 2",
                               [id, killedAtDB])[0].double("gap")
        XCTAssertGreaterThan(gap, 1.4, "the second attempt started \(gap) s after the kill, before the lease could expire")
        XCTAssertEqual(try Results.images(db, jobID: id).count, 30)
        XCTAssertTrue(b.process.isRunning)
    }

    func testPostgresRestartedMidJob_daemonReconnects_andJobCompletes() throws {
        let id = try submit(try makeCollection("restart", images: 30))
        let d = try startDaemon("steady", settings: ["image_delay_seconds": "0.1"])
        try waitUntil("job is running", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 3 }
        db.close()
        try cluster.restart()
        db = try PostgresConnection(conninfo: conninfo)
        let row = try waitState(id, ["succeeded", "failed"], timeout: 60)
        XCTAssertEqual(try row.string("state"), "succeeded", d.log)
        XCTAssertEqual(try Results.images(db, jobID: id).count, 30)
        XCTAssertTrue(d.process.isRunning)
        XCTAssertTrue(d.log.contains("reconnected to the database"), "the daemon should log its reconnection")
        // And it still serves new work (its LISTEN was renewed after the reconnect).
        let next = try submit(try makeCollection("after", images: 2))
        XCTAssertEqual(try waitState(next, ["succeeded", "failed"], timeout: 15).string("state"), "succeeded")
    }

    /// While PostgreSQL is down, an idle daemon used to try about 90 times a second and log every
    /// twentieth try. Now it backs off (0.1 s doubling to 5 s, jittered), logs once when the outage
    /// begins and once on recovery with the number of failed tries.
    func testPostgresDown_idleDaemonBacksOff_andLogsOncePerOutage() throws {
        let d = try startDaemon("patient")
        db.close()
        try cluster.serverTool("pg_ctl", ["-D", cluster.dataDir, "-m", "fast", "-w", "-t", "30", "stop"])
        Thread.sleep(forTimeInterval: 8)
        try cluster.start()
        db = try PostgresConnection(conninfo: conninfo)
        try waitUntil("the daemon logs its recovery", timeout: 20) { d.log.contains("database available again") }
        let log = d.log
        XCTAssertEqual(log.components(separatedBy: "database unavailable;").count - 1, 1, log)
        XCTAssertEqual(log.components(separatedBy: "database available again").count - 1, 1, log)
        let line = log.split(separator: "\n").first { $0.contains("database available again") }!
        let tries = Int(line.split(separator: " ").first { $0.hasPrefix("failed_tries=") }!.dropFirst("failed_tries=".count))!
        print("failed reconnect tries during an 8 s outage: \(tries)")
        XCTAssertGreaterThanOrEqual(tries, 3, "it kept trying")
        XCTAssertLessThanOrEqual(tries, 15, "0.1 s doubling to 5 s allows about 8 tries in 8 s, not hundreds")
        XCTAssertTrue(d.process.isRunning)
        let next = try submit(try makeCollection("after-outage", images: 2))
        XCTAssertEqual(try waitState(next, ["succeeded", "failed"], timeout: 20).string("state"), "succeeded")
    }

    func testCancelRunningJob_stopsWithinSeconds() throws {
        let id = try submit(try makeCollection("cancel", images: 100))
        _ = try startDaemon("c", settings: ["image_delay_seconds": "0.1"])
        try waitUntil("job is running", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 2 }
        let start = Date()
        XCTAssertEqual(try db.query("SELECT nola.cancel($1)::text AS s", [id])[0].string("s"), "running")
        let row = try waitState(id, ["cancelled", "succeeded", "failed"], timeout: 10)
        let latency = Date().timeIntervalSince(start)
        print("cancel → cancelled latency: \(String(format: "%.3f", latency)) s")
        XCTAssertEqual(try row.string("state"), "cancelled")
        XCTAssertLessThan(latency, 3)
        XCTAssertEqual(try row.optionalString("error"), "cancelled while running (stage discover)")
        XCTAssertEqual(try db.query("SELECT outcome FROM nola.attempts WHERE job_id = $1", [id])[0].string("outcome"), "cancelled")
        XCTAssertEqual(try db.query("SELECT nola.cancel($1)::text AS s", [id])[0].string("s"), "cancelled", "cancelling again is harmless")
    }

    func testForgedCancelNotification_fromARoleWithNoGrants_isIgnored() throws {
        // Anyone who can connect may NOTIFY any channel; the daemon must act only on the job's own flag.
        let user = "outsider_\(dbname)"
        try db.query("DROP ROLE IF EXISTS \(user)")
        try db.query("CREATE ROLE \(user) LOGIN")
        defer { _ = try? db.query("DROP ROLE \(user)") }
        let id = try submit(try makeCollection("forged", images: 30))
        let d = try startDaemon("f", settings: ["image_delay_seconds": "0.05"])
        try waitUntil("job is running", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 2 }
        let c = try PostgresConnection(conninfo: conninfo.replacingOccurrences(of: "user=postgres", with: "user=\(user)"))
        defer { c.close() }
        XCTAssertThrowsError(try c.query("SELECT nola.cancel($1)", [id]), "the outsider has no grant on schema nola")
        for _ in 0..<3 { try c.query("SELECT pg_notify('nola_cancel', $1)", [String(id)]) }
        let row = try waitState(id, ["cancelled", "succeeded", "failed"], timeout: 20)
        XCTAssertEqual(try row.string("state"), "succeeded", d.log)
        XCTAssertFalse(try row.bool("cancel_requested"))
        XCTAssertEqual(try db.query("SELECT outcome FROM nola.attempts WHERE job_id = $1", [id])[0].string("outcome"), "succeeded")
        XCTAssertFalse(d.log.contains("cancel requested"), d.log)
    }

    func testSigterm_releasesRunningJob_withoutBurningAnAttempt() throws {
        let id = try submit(try makeCollection("term", images: 100), maxAttempts: 1)
        let d = try startDaemon("leaving", settings: ["image_delay_seconds": "0.1"])
        try waitUntil("job is running", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 2 }
        let start = Date()
        d.signal(SIGTERM)
        let status = d.waitExit(timeout: 10)
        print("SIGTERM → exit: \(String(format: "%.3f", Date().timeIntervalSince(start))) s")
        XCTAssertEqual(status, 0, d.log)
        var row = try job(id)
        XCTAssertEqual(try row.string("state"), "queued")
        XCTAssertEqual(try row.int("attempts_used"), 0, "released without burning an attempt")
        XCTAssertNil(try row.optionalString("worker"))
        XCTAssertEqual(try db.query("SELECT outcome FROM nola.attempts WHERE job_id = $1", [id])[0].string("outcome"), "released")
        XCTAssertNotNil(try db.query("SELECT stopped_at FROM nola.workers WHERE name = 'leaving'")[0].optionalString("stopped_at"))
        // max_attempts is 1: the job can still run, because the released attempt did not count.
        _ = try startDaemon("next")
        row = try waitState(id, ["succeeded", "failed"], timeout: 15)
        XCTAssertEqual(try row.string("state"), "succeeded")
        XCTAssertEqual(try row.int("attempt"), 2)
        XCTAssertEqual(try row.int("attempts_used"), 1)
    }

    func testJobTimeout_failsTheJobWithAMessage() throws {
        let id = try submit(try makeCollection("timeout", images: 100), timeout: "1 second")
        _ = try startDaemon("t", settings: ["image_delay_seconds": "0.1"])
        let row = try waitState(id, ["succeeded", "failed"], timeout: 15)
        XCTAssertEqual(try row.string("state"), "failed")
        XCTAssertEqual(try row.optionalString("error"), "timed out after 1 s (the job's timeout)")
        XCTAssertEqual(try db.query("SELECT outcome FROM nola.attempts WHERE job_id = $1", [id])[0].string("outcome"), "timed_out")
    }

    func testStatusView_showsProgressRateAndEta_whileRunning() throws {
        let id = try submit(try makeCollection("watch", images: 40))
        _ = try startDaemon("w", settings: ["image_delay_seconds": "0.05"])
        try waitUntil("job is past a quarter", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 10 }
        let row = try db.query("SELECT state::text, stage, progress::float8 AS p, images_done, images_total, rate::float8 AS r, eta, worker FROM nola.job_status WHERE id = $1", [id])[0]
        XCTAssertEqual(try row.string("state"), "running")
        XCTAssertEqual(try row.string("stage"), "discover")
        XCTAssertEqual(try row.int("images_total"), 40)
        XCTAssertGreaterThan(try row.double("p"), 0)
        XCTAssertLessThan(try row.double("p"), 1)
        XCTAssertGreaterThan(try row.double("r"), 0)
        XCTAssertNotNil(try row.optionalString("eta"))
        XCTAssertTrue(try row.string("worker").hasPrefix("w-"))
        let done = try waitState(id, ["succeeded", "failed"], timeout: 15)
        XCTAssertEqual(try done.string("state"), "succeeded")
        XCTAssertEqual(try db.query("SELECT progress::float8 AS p FROM nola.job_status WHERE id = $1", [id])[0].double("p"), 1)
        let (status, output) = try runProgram(try noladExecutable(), ["status", String(id), "--events", "--database", conninfo])
        XCTAssertEqual(status, 0, output)
        XCTAssertTrue(output.contains("succeeded"), output)
        XCTAssertTrue(output.contains("stage_started"), output)
        XCTAssertTrue(output.contains("\"images\": 40"), output)
    }

    func testSystemdNotify_readyStatusWatchdogAndStopping() throws {
        // A datagram socket standing in for systemd's NOTIFY_SOCKET.
        let path = root + "/notify.sock"
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        XCTAssertEqual(bound, 0)
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        var messages: [String] = []
        func receive() {
            var buffer = [UInt8](repeating: 0, count: 4096)
            while true {
                let n = recv(fd, &buffer, buffer.count, 0)
                if n <= 0 { break }
                messages.append(String(decoding: buffer[0..<n], as: UTF8.self))
            }
        }

        let id = try submit(try makeCollection("notified", images: 20))
        let d = try startDaemon("sd", settings: ["image_delay_seconds": "0.1"],
                                environment: ["NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"])
        try waitUntil("the job runs", timeout: 10) { (try job(id).optionalInt("stage_done") ?? 0) >= 5 }
        Thread.sleep(forTimeInterval: 0.6)
        receive()
        d.signal(SIGTERM)
        XCTAssertEqual(d.waitExit(timeout: 10), 0)
        receive()
        let all = messages.joined(separator: "\n")
        let lines = all.split(separator: "\n").map(String.init)
        guard let ready = lines.firstIndex(of: "READY=1") else { return XCTFail("no READY=1 in \(messages)") }
        XCTAssertFalse(lines[..<ready].contains { $0.hasPrefix("STATUS=job") }, "READY=1 must come before any job runs")
        XCTAssertTrue(lines.contains { $0.hasPrefix("STATUS=job \(id) attempt 1: discover") }, "STATUS names job and stage: \(lines)")
        XCTAssertGreaterThanOrEqual(lines.filter { $0 == "WATCHDOG=1" }.count, 3, "watchdog pings every 0.2 s")
        guard let stopping = lines.firstIndex(of: "STOPPING=1") else { return XCTFail("no STOPPING=1 in \(messages)") }
        XCTAssertGreaterThan(stopping, ready)
        XCTAssertEqual(lines.last, "STATUS=stopped")
    }
}
