// Owners for jobs, the operator role, requeue, and the one parameter schema (migration 0004).
import Daemon
import Foundation
import Method
import Queue
import XCTest

final class OwnershipTests: DatabaseTestCase {
    /// A login role in `group`; closed and dropped at tear-down.
    func login(_ name: String, in group: String) throws -> PostgresConnection {
        let user = "\(name)_\(getpid())"
        try db.query("DROP ROLE IF EXISTS \(user)")
        try db.query("CREATE ROLE \(user) LOGIN IN ROLE \(group)")
        let c = try PostgresConnection(conninfo: conninfo.replacingOccurrences(of: "user=postgres", with: "user=\(user)"))
        addTeardownBlock { [db] in
            c.close()
            _ = try? db?.query("DROP OWNED BY \(user)")
            _ = try? db?.query("DROP ROLE \(user)")
        }
        return c
    }

    func refusal(_ c: PostgresConnection, _ sql: String, _ params: [PostgresBindable?]) -> DatabaseError? {
        do {
            try c.query(sql, params)
            return nil
        } catch {
            return error as? DatabaseError
        }
    }

    func testSubmitterCancelsAndRequeuesOnlyOwnJobs_operatorAnyJob() throws {
        let alice = try login("alice", in: "nola_submitter")
        let bob = try login("bob", in: "nola_submitter")
        let carol = try login("carol", in: "nola_operator")
        let a1 = Int64(try alice.query("INSERT INTO nola.jobs (collection, classes) VALUES ('/data/x', '{a,b}') RETURNING id")[0].int("id"))
        let a2 = Int64(try alice.query("INSERT INTO nola.jobs (collection, classes) VALUES ('/data/y', '{a,b}') RETURNING id")[0].int("id"))
        XCTAssertEqual(try db.query("SELECT submitted_by FROM nola.jobs WHERE id = $1", [a1])[0].string("submitted_by"), "alice_\(getpid())")
        XCTAssertEqual(refusal(alice, "INSERT INTO nola.jobs (collection, classes, submitted_by) VALUES ('/x', '{a}', 'bob')", [])?.sqlState,
                       "42501", "submitted_by is not the submitter's to set")

        // Bob may not cancel Alice's job; the refusal says why.
        let e = refusal(bob, "SELECT nola.cancel($1)", [a1])
        XCTAssertEqual(e?.sqlState, "42501")
        XCTAssertEqual(e?.message, "job \(a1) was submitted by alice_\(getpid()); only its submitter or a member of nola_operator may cancel it")
        XCTAssertEqual(try job(a1).string("state"), "queued")
        // Alice may; so may the operator, on any job.
        XCTAssertEqual(try alice.query("SELECT nola.cancel($1)::text AS s", [a1])[0].string("s"), "cancelled")
        XCTAssertEqual(try carol.query("SELECT nola.cancel($1)::text AS s", [a2])[0].string("s"), "cancelled")

        // Requeue: not Bob's, only failed or cancelled jobs, and the history stays.
        XCTAssertEqual(refusal(bob, "SELECT nola.requeue($1)", [a1])?.message,
                       "job \(a1) was submitted by alice_\(getpid()); only its submitter or a member of nola_operator may requeue it")
        XCTAssertEqual(try carol.query("SELECT nola.requeue($1)::text AS s", [a1])[0].string("s"), "queued")
        let again = refusal(alice, "SELECT nola.requeue($1)", [a1])
        XCTAssertEqual(again?.sqlState, "55000")
        XCTAssertEqual(again?.message, "job \(a1) is queued; only a failed or cancelled job can be requeued")
        XCTAssertEqual(try alice.query("SELECT nola.requeue($1)::text AS s", [a2])[0].string("s"), "queued")
        XCTAssertNil(try alice.query("SELECT nola.requeue(999999)::text AS s")[0].optionalString("s"), "no such job")
        let events = try db.query("SELECT kind, metrics->>'by' AS by FROM nola.events WHERE job_id = $1 ORDER BY id", [a1])
        XCTAssertEqual(try events.rows.map { try $0.string("kind") }, ["cancelled", "requeued"])
        XCTAssertEqual(try events.rows.map { try $0.string("by") }, ["alice_\(getpid())", "carol_\(getpid())"])
    }

    func testRequeue_failedJob_runsAgainWithFreshAttempts_historyAndCheckpointKept() throws {
        let id = try submit(try makeCollection("requeue", images: 3), maxAttempts: 1)
        // The job fails once (its collection vanished), with a checkpoint left from its run.
        let collection = try db.query("SELECT collection FROM nola.jobs WHERE id = $1", [id])[0].string("collection")
        try FileManager.default.moveItem(atPath: collection, toPath: collection + ".away")
        _ = try startDaemon("r")
        XCTAssertEqual(try waitState(id, ["succeeded", "failed"], timeout: 15).string("state"), "failed")
        try db.query("INSERT INTO nola.checkpoints (job_id, blob, epoch, step) VALUES ($1, '\\x00', 2, 7)", [id])

        try FileManager.default.moveItem(atPath: collection + ".away", toPath: collection)
        XCTAssertEqual(try db.query("SELECT nola.requeue($1)::text AS s", [id])[0].string("s"), "queued")
        let row = try waitState(id, ["succeeded", "failed"], timeout: 15)
        let error = try row.optionalString("error") ?? ""
        XCTAssertEqual(try row.string("state"), "succeeded", error)
        XCTAssertEqual(try row.int("attempt"), 2, "attempt numbers go on")
        XCTAssertEqual(try row.int("attempts_used"), 1, "max_attempts 1 counted afresh")
        let outcomes = try db.query("SELECT outcome FROM nola.attempts WHERE job_id = $1 ORDER BY attempt", [id])
        XCTAssertEqual(try outcomes.rows.map { try $0.string("outcome") }, ["failed", "succeeded"])
        XCTAssertEqual(try db.query("SELECT metrics->>'checkpoint' AS c FROM nola.events WHERE job_id = $1 AND kind = 'requeued'", [id])[0].string("c"), "true")

        // The CLI says the same: a succeeded job cannot be requeued, and says why on stderr.
        let (status, output) = try runProgram(try noladExecutable(), ["requeue", "--database", conninfo, String(id)])
        XCTAssertEqual(status, 1, output)
        XCTAssertTrue(output.contains("job \(id) is succeeded; only a failed or cancelled job can be requeued"), output)
        let (status2, output2) = try runProgram(try noladExecutable(), ["requeue", "--database", conninfo, "999999"])
        XCTAssertEqual(status2, 1, output2)
        XCTAssertTrue(output2.contains("no job 999999"), output2)
    }

    func testParameterSchema_inSQL_isParameterSpec_andBothRefuseInTheSameWords() throws {
        let rows = try db.query("""
            SELECT name, kind, minimum::float8 AS lo, maximum::float8 AS hi, exclusive_minimum, exclusive_maximum, nullable
            FROM nola.parameter_schema ORDER BY name
            """)
        var sql: [String: String] = [:]
        for r in rows.rows {
            sql[try r.string("name")] = "\(try r.string("kind")) \(try r.optionalString("lo") ?? "-") \(try r.optionalString("hi") ?? "-") "
                + "\(try r.bool("exclusive_minimum")) \(try r.bool("exclusive_maximum")) \(try r.bool("nullable"))"
        }
        func text(_ x: Double?) -> String { x.map { $0 == $0.rounded() ? String(Int64($0)) : String($0) } ?? "-" }
        var swift: [String: String] = [:]
        for p in ParameterSpec.all {
            swift[p.name] = "\(p.kind.rawValue) \(text(p.minimum)) \(text(p.maximum)) \(p.exclusiveMinimum) \(p.exclusiveMaximum) \(p.nullable)"
        }
        XCTAssertEqual(sql, swift)

        // The same bad value is refused by INSERT and by the daemon with the same reason.
        let bad = [#"{"min_k": -3}"#, #"{"prompt_lr": 0}"#, #"{"label_smoothing": 1}"#, #"{"seed": "7"}"#, #"{"templates": 1}"#,
                   #"{"prompt_micro_batch_size": 0}"#, #"{"clip_model": "../x"}"#, #"{"prompts_from_job": -3}"#, #"{"k_fraction": 1.5}"#,
                   #"{"only_new": true}"#, #"{"stop_patience": -1}"#, #"{"stop_tolerance": 0}"#,
                   #"{"prompt_view_budget": 0}"#, #"{"prompt_view_budget": 2.5}"#]
        for json in bad {
            var daemon = ""
            XCTAssertThrowsError(try JobParameters(json: Data(json.utf8))) { daemon = ($0 as? MethodError)?.reason ?? "\($0)" }
            let e = refusal(db, "INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/x', '{a}', $1::jsonb)", [json])
            XCTAssertEqual(e?.sqlState, "23514", json)
            XCTAssertTrue(e?.message.hasSuffix(" " + daemon) ?? false, "\(json): SQL says \(e?.message ?? "nothing"), the daemon says \(daemon)")
        }
        // And both accept what the daemon records, and no cap.
        let recorded = String(decoding: NolaParameters().encodedJSON(), as: UTF8.self)
        XCTAssertNoThrow(try db.query("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/x', '{a}', $1::jsonb)", [recorded]))
        XCTAssertNoThrow(try db.query("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ('/x', '{a}', $1::jsonb)",
                                      [#"{"prompt_view_budget": null}"#]))
    }
}
