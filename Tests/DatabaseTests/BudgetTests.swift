import Foundation
import XCTest

/// The training budget (`prompt_view_budget`, docs/budget.md) through the daemon: a capped job ends prompt
/// tuning at the cap, mid-epoch, with a checkpoint and a `budget_reached` event, and a job resumed from
/// that checkpoint takes no further step.
final class BudgetJobTests: DatabaseTestCase {
    func testViewBudget_endsTuningAtTheCapWithACheckpointAndAnEvent_andAResumedJobHonoursIt() throws {
        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        _ = try startDaemon("budget", settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2"])
        // The first attempt cannot write its labels, so it fails after tuning and keeps its checkpoint.
        try db.query("""
            CREATE FUNCTION refuse_labels() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'label rows refused by the test'; END $$
            """)
        try db.query("CREATE TRIGGER refuse_labels BEFORE INSERT ON nola.labels FOR EACH ROW EXECUTE FUNCTION refuse_labels()")
        // 18 readable images in batches of 8: 2 steps an epoch, 20 planned; 60 views allow ⌊60/8⌋ = 7 steps,
        // which end after the first batch of the fourth epoch.
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, max_attempts) VALUES ($1, $2, $3::jsonb, 1) RETURNING id
            """, [collection, PipelineTests.classes,
                  #"{"prompt_epochs": 10, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 3, "prompt_view_budget": 60}"#])
        let id = Int64(try rows[0].int("id"))
        XCTAssertEqual(try waitState(id, ["succeeded", "failed"], timeout: 180).string("state"), "failed")
        var all = try events(id)
        XCTAssertEqual(all.filter { $0.stage == "tune" && $0.kind == "epoch" }.map { $0.metrics["epoch"] as? Int }, [1, 2, 3])
        let reached = try XCTUnwrap(all.first { $0.kind == "budget_reached" }, "a budget_reached event")
        XCTAssertEqual(reached.metrics["steps"] as? Int, 7)
        XCTAssertEqual(reached.metrics["step_budget"] as? Int, 7)
        XCTAssertEqual(reached.metrics["view_budget"] as? Int, 60)
        XCTAssertEqual(reached.metrics["strong_views"] as? Int, 56)
        XCTAssertEqual(reached.metrics["planned_steps"] as? Int, 20)
        XCTAssertEqual(reached.metrics["epoch"] as? Int, 3)
        XCTAssertEqual(reached.metrics["batch_in_epoch"] as? Int, 1)
        let tune = try XCTUnwrap(all.first { $0.stage == "tune" && $0.kind == "metrics" }).metrics
        XCTAssertEqual(tune["steps"] as? Int, 7)
        XCTAssertEqual(tune["stopped_at_budget"] as? Bool, true)
        let saved = try db.query("SELECT epoch, step FROM nola.checkpoints WHERE job_id = $1", [id])
        XCTAssertEqual(saved.count, 1, "the state at the cap is checkpointed")
        XCTAssertEqual(try saved[0].int("step"), 7)

        // Requeued with the labels allowed: tuning resumes at the cap and takes no step; the job succeeds.
        try db.query("DROP TRIGGER refuse_labels ON nola.labels")
        XCTAssertEqual(try db.query("SELECT nola.requeue($1)::text AS s", [id])[0].string("s"), "queued")
        let row = try waitState(id, ["succeeded", "failed"], timeout: 180)
        let error = try row.optionalString("error") ?? ""
        XCTAssertEqual(try row.string("state"), "succeeded", error)
        all = try events(id)
        let resumed = try XCTUnwrap(all.first { $0.kind == "resumed" }, "a resumed event")
        XCTAssertEqual(resumed.metrics["step"] as? Int, 7)
        XCTAssertEqual(all.filter { $0.kind == "epoch" && $0.attempt == 2 }.count, 0, "no epoch runs after the cap")
        let second = try XCTUnwrap(all.last { $0.stage == "tune" && $0.kind == "metrics" }).metrics
        XCTAssertEqual(second["steps"] as? Int, 7)
        XCTAssertEqual(second["stopped_at_budget"] as? Bool, true)
        XCTAssertEqual(all.filter { $0.kind == "budget_reached" }.count, 2, "each attempt says where it ended")
        let labelled = try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1 AND label IS NOT NULL", [id])
        XCTAssertEqual(try labelled[0].int("n"), 18)
    }
}
