import Foundation
import Queue
import XCTest

/// nola.tuning_units against a real PostgreSQL: claims skip what others hold, a lost lease is rescued,
/// writes are guarded and happen once, a new attempt starts clean, a cancel stops the claims.
final class TuningUnitsTests: DatabaseTestCase {
    func units(_ count: Int) -> [TuningUnits.NewUnit] {
        (0..<count).map { u in
            TuningUnits.NewUnit(unit: u, images: [2 * u, 2 * u + 1], targets: [u % 3, 1], files: [Array("/c/\(2 * u).jpg".utf8), [0x2f, 0xff, 0x00, 0x41]])
        }
    }

    func testClaimsComputeOnce_lostLeasesAreRescued_andOnlyTheLeaseHolderWrites() throws {
        let id = try submit(try makeCollection("pets", images: 3))
        let job = try XCTUnwrap(try JobStore.claim(db, worker: "owner", leaseSeconds: 30)).ref
        XCTAssertNil(try TuningUnits.claim(db, worker: "helper", leaseSeconds: 30), "nothing published yet")
        XCTAssertTrue(try TuningUnits.begin(db, job))
        XCTAssertTrue(try TuningUnits.publish(db, job, step: 1, epoch: 0, logicalBatch: 6, parameters: [1, 2, 3], units: units(3)))
        XCTAssertEqual(try TuningUnits.parameters(db, jobID: id, attempt: job.attempt, step: 1), [1, 2, 3])
        XCTAssertNil(try TuningUnits.parameters(db, jobID: id, attempt: job.attempt, step: 2))

        // Two connections claim at once: different units (SKIP LOCKED), in unit order.
        let other = try PostgresConnection(conninfo: conninfo)
        defer { other.close() }
        let a = try XCTUnwrap(try TuningUnits.claim(db, worker: "helper-a", leaseSeconds: 30))
        let b = try XCTUnwrap(try TuningUnits.claim(other, worker: "helper-b", leaseSeconds: 2))
        XCTAssertEqual([a.unit, b.unit], [0, 1])
        XCTAssertEqual(a.images, [0, 1]); XCTAssertEqual(a.targets, [0, 1]); XCTAssertEqual(a.logicalBatch, 6)
        XCTAssertEqual(a.files, [Array("/c/0.jpg".utf8), [0x2f, 0xff, 0x00, 0x41]], "path bytes survive, NUL and non-UTF-8 included")
        XCTAssertTrue(try TuningUnits.complete(db, a, worker: "helper-a", result: [9, 9], seconds: 0.1))
        XCTAssertFalse(try TuningUnits.complete(db, a, worker: "helper-a", result: [7, 7], seconds: 0.1), "written once")
        XCTAssertFalse(try TuningUnits.complete(db, b, worker: "helper-a", result: [7, 7], seconds: 0.1), "not the lease holder")

        // b's lease expires: the owner takes unit 1 over after unit 2, and b's late write is refused.
        let c = try XCTUnwrap(try TuningUnits.claim(db, worker: "owner", leaseSeconds: 30, jobID: id))
        XCTAssertEqual(c.unit, 2)
        Thread.sleep(forTimeInterval: 2.5)
        let rescued = try XCTUnwrap(try TuningUnits.claim(db, worker: "owner", leaseSeconds: 30, jobID: id))
        XCTAssertEqual(rescued.unit, 1)
        XCTAssertEqual(rescued.claims, 2)
        XCTAssertTrue(rescued.rescued)
        XCTAssertFalse(c.rescued)
        XCTAssertFalse(try TuningUnits.complete(other, b, worker: "helper-b", result: [5], seconds: 1), "a worker whose lease is gone writes nothing")
        XCTAssertTrue(try TuningUnits.complete(db, rescued, worker: "owner", result: [1], seconds: 1))
        XCTAssertNil(try TuningUnits.claim(db, worker: "helper-a", leaseSeconds: 30), "unit 2 is held, the others are done")
        XCTAssertEqual(try TuningUnits.progress(db, job, step: 1).done, 2)
        XCTAssertEqual(try TuningUnits.results(db, job, step: 1, units: [0, 1, 2]).map(\.unit), [0, 1])
        XCTAssertEqual(try TuningUnits.results(db, job, step: 1, units: [1]).map(\.result), [[1]])

        // A helper that stops gives its unit back at once.
        try TuningUnits.release(db, c, worker: "owner")

        // One that cannot do it gives it back with its reason: kept for the job's tuning, shown in job_status,
        // and that worker does not count as contributing. A second give-back of a unit no longer held writes nothing.
        let refused = try XCTUnwrap(try TuningUnits.claim(other, worker: "helper-c", leaseSeconds: 30))
        XCTAssertEqual(refused.unit, 2)
        try TuningUnits.release(other, refused, worker: "helper-c", error: "worker helper-c: its CLIP does not load here")
        try TuningUnits.release(other, refused, worker: "helper-c", error: "not held any more")
        try db.query("UPDATE nola.jobs SET stage = 'tune' WHERE id = $1", [id])
        let status = try db.query("""
            SELECT workers_contributing::int AS n, worker_rates -> 'helper-c' ->> 'gave_back' AS reason,
                   worker_rates -> 'helper-a' ->> 'gave_back' AS none FROM nola.job_status WHERE id = $1
            """, [id])[0]
        XCTAssertEqual(try status.optionalString("reason"), "worker helper-c: its CLIP does not load here")
        XCTAssertNil(try status.optionalString("none"))
        XCTAssertEqual(try status.int("n"), 2, "helper-a and the owner computed units; helper-c only gave one back")
        let again = try XCTUnwrap(try TuningUnits.claim(other, worker: "helper-b", leaseSeconds: 30))
        XCTAssertEqual(again.unit, 2)
        XCTAssertFalse(again.rescued, "given back, not rescued")
        XCTAssertTrue(try TuningUnits.complete(other, again, worker: "helper-b", result: [2], seconds: 1))
        XCTAssertEqual(try TuningUnits.progress(db, job, step: 1).done, 3)

        // The next step replaces the last one's rows; publishing twice keeps what is done.
        XCTAssertTrue(try TuningUnits.publish(db, job, step: 2, epoch: 0, logicalBatch: 6, parameters: [4], units: units(2)))
        XCTAssertEqual(try TuningUnits.progress(db, job, step: 1).total, 0)
        let d = try XCTUnwrap(try TuningUnits.claim(db, worker: "helper-a", leaseSeconds: 30))
        XCTAssertEqual(d.step, 2)
        XCTAssertTrue(try TuningUnits.complete(db, d, worker: "helper-a", result: [3], seconds: 1))
        XCTAssertTrue(try TuningUnits.publish(db, job, step: 2, epoch: 0, logicalBatch: 6, parameters: [4], units: units(2)))
        XCTAssertEqual(try TuningUnits.progress(db, job, step: 2).done, 1)

        // A cancel request stops helpers' claims; a job that is not ours cannot publish.
        try db.query("UPDATE nola.jobs SET cancel_requested = true WHERE id = $1", [id])
        XCTAssertNil(try TuningUnits.claim(db, worker: "helper-a", leaseSeconds: 30))
        try db.query("UPDATE nola.jobs SET cancel_requested = false WHERE id = $1", [id])
        let stranger = JobRef(id: id, attempt: job.attempt, worker: "someone-else")
        XCTAssertFalse(try TuningUnits.publish(db, stranger, step: 3, epoch: 0, logicalBatch: 6, parameters: [5], units: units(1)))
        XCTAssertFalse(try TuningUnits.begin(db, stranger))
        XCTAssertEqual(try TuningUnits.progress(db, job, step: 2).total, 2, "the refused publish changed nothing")

        // A new attempt starts clean.
        XCTAssertTrue(try TuningUnits.begin(db, job))
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.tuning_units WHERE job_id = $1", [id])[0].int("n"), 0)
        XCTAssertNil(try TuningUnits.parameters(db, jobID: id, attempt: job.attempt, step: 2))
    }
}
