import Foundation
import Queue
import XCTest

/// Incremental labelling (`prompts_from_job` + `only_new`, docs/incremental.md) through the daemon, the CLI
/// and the database, with the tiny fixture models of PipelineTests.
final class IncrementalTests: DatabaseTestCase {
    static let classes = PipelineTests.classes

    func copyCollection() throws -> String {
        let path = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: path)
        return path
    }

    /// A new image: a copy of `from` with bytes appended after its end (decodes the same, new SHA-256).
    func addImage(_ collection: String, _ name: String, from: String, salt: UInt8) throws {
        let data = try Data(contentsOf: URL(fileURLWithPath: collection + "/" + from)) + Data([salt, salt])
        XCTAssertTrue(FileManager.default.createFile(atPath: collection + "/" + name, contents: data))
    }

    func submitCLI(_ collection: String, _ args: [String]) throws -> (Int32, String) {
        try runProgram(try noladExecutable(), ["submit", "--database", conninfo, collection]
                       + Self.classes.flatMap { ["--class", $0] } + args)
    }

    /// (label, confidence, zero-shot label, zero-shot confidence) of every labelled row of a job, by path, as text.
    func rows(_ job: Int64) throws -> [String: String] {
        let r = try db.query("""
            SELECT path, concat_ws('|', label, confidence::text, zero_shot_label, zero_shot_confidence::text) AS row
            FROM nola.labels WHERE job_id = $1 AND label IS NOT NULL
            """, [job])
        var out: [String: String] = [:]
        for row in r.rows { out[try row.string("path")] = try row.string("row") }
        return out
    }

    /// `a` and `b` name the same images with the same labels and zero-shot labels, and confidences within
    /// `tolerance`; returns the largest confidence difference. (Recomputed rather than copied, a row is
    /// not always the same bits: with OpenBLAS's Haswell kernels, which Zen CPUs get, a row of a GEMM
    /// comes out in other last bits at another position in the batch, and a collection that grew puts
    /// images at other positions; docs/threading.md.)
    func assertSameLabels(_ a: [String: String], _ b: [String: String], tolerance: Double = 1e-5,
                          file: StaticString = #filePath, line: UInt = #line) -> Double {
        XCTAssertEqual(Set(a.keys), Set(b.keys), file: file, line: line)
        var worst = 0.0
        for (path, row) in a {
            let x = row.split(separator: "|").map(String.init), y = (b[path] ?? "").split(separator: "|").map(String.init)
            guard x.count == 4, y.count == 4 else { XCTFail("\(path): \(row) against \(b[path] ?? "nothing")", file: file, line: line); continue }
            XCTAssertEqual(x[0], y[0], "\(path): label", file: file, line: line)
            XCTAssertEqual(x[2], y[2], "\(path): zero-shot label", file: file, line: line)
            for i in [1, 3] {
                guard let p = Double(x[i]), let q = Double(y[i]) else { XCTFail("\(path): \(row) against \(b[path]!)", file: file, line: line); continue }
                worst = max(worst, abs(p - q))
            }
        }
        XCTAssertLessThanOrEqual(worst, tolerance, "largest confidence difference", file: file, line: line)
        return worst
    }

    func labelMetrics(_ job: Int64) throws -> [String: Any] {
        try XCTUnwrap(try events(job).first { $0.stage == "label" && $0.kind == "metrics" }).metrics
    }

    func testOnlyNew_labelsExactlyTheNewImages_copiesTheRest_andARenamedIdenticalFileIsCopied() throws {
        let collection = try copyCollection()
        _ = try startDaemon("incremental", settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2"])
        let firstRows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, $2, $3::jsonb) RETURNING id
            """, [collection, Self.classes, #"{"prompt_epochs": 2, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 3}"#])
        let first = Int64(try firstRows[0].int("id"))
        try waitSucceeded(first, timeout: 180)
        let before = try rows(first)
        XCTAssertEqual(before.count, 18, "18 readable fixture images (bad.jpg is unreadable)")
        XCTAssertEqual(try labelMetrics(first)["computed"] as? Int, 18)
        XCTAssertEqual(try labelMetrics(first)["copied"] as? Int, 0)

        // Three new images, and one old image under a second name (identical bytes).
        try addImage(collection, "red_ball/new-a.jpg", from: "red_ball/00.jpg", salt: 1)
        try addImage(collection, "green_leaf/new-b.jpg", from: "green_leaf/01.jpg", salt: 2)
        try addImage(collection, "blue_sky/new-c.png", from: "blue_sky/02.png", salt: 3)
        try FileManager.default.copyItem(atPath: collection + "/blue_sky/03.jpg", toPath: collection + "/blue_sky/renamed.jpg")

        // The CLI refuses --only-new without --prompts-from, and so does the database.
        let (refused, message) = try submitCLI(collection, ["--only-new"])
        XCTAssertEqual(refused, 1, message)
        XCTAssertTrue(message.contains("--only-new needs --prompts-from JOB"), message)
        XCTAssertThrowsError(try db.query("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, '{a}', $2::jsonb)",
                                          [collection, #"{"only_new": true}"#])) { error in
            let e = error as? DatabaseError
            XCTAssertEqual(e?.sqlState, "23514")
            XCTAssertTrue(e?.message.contains(#"parameter "only_new" is true only with prompts_from_job"#) ?? false, "\(error)")
        }

        let (status, output) = try submitCLI(collection, ["--prompts-from", String(first), "--only-new"])
        XCTAssertEqual(status, 0, output)
        let second = try XCTUnwrap(Int64(output.trimmingCharacters(in: .whitespacesAndNewlines)), output)
        let parameters = try db.query("SELECT parameters::text AS p FROM nola.jobs WHERE id = $1", [second])
        XCTAssertEqual(try parameters[0].string("p"), "{\"only_new\": true, \"prompts_from_job\": \(first)}")
        try waitSucceeded(second, timeout: 180)

        // Exactly the three new contents went through CLIP: in the encode stage (feature cache) and the label stage.
        let label = try labelMetrics(second)
        XCTAssertEqual(label["computed"] as? Int, 3, "\(label)")
        XCTAssertEqual(label["copied"] as? Int, 19, "18 old images and the renamed copy")
        XCTAssertEqual(label["labelled"] as? Int, 22)
        XCTAssertEqual(label["only_new"] as? Bool, true)
        let encode = try XCTUnwrap(try events(second).first { $0.stage == "encode" && $0.kind == "metrics" }).metrics
        XCTAssertEqual(encode["encoded"] as? Int, 3, "\(encode)")

        // The copied rows are the first job's, value for value; the renamed file carries its original's row.
        let after = try rows(second)
        XCTAssertEqual(after.count, 22)
        for (path, row) in before { XCTAssertEqual(after[path], row, path) }
        XCTAssertEqual(after["blue_sky/renamed.jpg"], before["blue_sky/03.jpg"])
        let unreadable = try db.query("SELECT unreadable FROM nola.labels WHERE job_id = $1 AND path = 'red_ball/bad.jpg'", [second])
        XCTAssertNotNil(try unreadable[0].optionalString("unreadable"), "an image unreadable before is tried again, and is still unreadable")

        // Every row equals what labelling the whole grown collection with the same prompts gives.
        let full = try submitCLI(collection, ["--prompts-from", String(first)])
        XCTAssertEqual(full.0, 0, full.1)
        let third = try XCTUnwrap(Int64(full.1.trimmingCharacters(in: .whitespacesAndNewlines)))
        try waitSucceeded(third, timeout: 180)
        XCTAssertEqual(try labelMetrics(third)["computed"] as? Int, 22)
        let worst = assertSameLabels(try rows(third), after)
        print("incremental: the whole collection relabelled gives the same labels; confidences within \(worst)")

        // A later increment copies from every job that labelled with these prompts: only the newest image is new.
        try addImage(collection, "red_ball/new-d.jpg", from: "red_ball/01.jpg", salt: 4)
        let (status4, output4) = try submitCLI(collection, ["--prompts-from", String(first), "--only-new"])
        XCTAssertEqual(status4, 0, output4)
        let fourth = try XCTUnwrap(Int64(output4.trimmingCharacters(in: .whitespacesAndNewlines)))
        try waitSucceeded(fourth, timeout: 180)
        XCTAssertEqual(try labelMetrics(fourth)["computed"] as? Int, 1)
        XCTAssertEqual(try labelMetrics(fourth)["copied"] as? Int, 22)
    }
}

/// The label-free stopping rule (`stop_patience`, `stop_tolerance`) through the daemon: the epoch events
/// and the tune stage's metrics say where and why it stopped.
final class StopRuleJobTests: DatabaseTestCase {
    func testStopPatience_endsPromptTuningEarly_andTheEventsSayWhereAndWhy() throws {
        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        _ = try startDaemon("stop-rule", settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2"])
        // Tolerance 1: every epoch after the first is stable, so patience 2 stops after epoch 3 of 10.
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, $2, $3::jsonb) RETURNING id
            """, [collection, PipelineTests.classes,
                  #"{"prompt_epochs": 10, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 3, "stop_patience": 2, "stop_tolerance": 1}"#])
        let id = Int64(try rows[0].int("id"))
        try waitSucceeded(id, timeout: 180)
        let all = try events(id)
        let epochs = all.filter { $0.stage == "tune" && $0.kind == "epoch" }
        XCTAssertEqual(epochs.map { $0.metrics["epoch"] as? Int }, [1, 2, 3])
        XCTAssertEqual(epochs.map { $0.metrics["stable_epochs"] as? Int }, [0, 1, 2])
        XCTAssertTrue(epochs.allSatisfy { ($0.metrics["mean_confidence"] as? Double).map { $0 > 0 && $0 <= 1 } ?? false })
        XCTAssertTrue(epochs.prefix(2).allSatisfy { $0.metrics["stop_reason"] is NSNull })
        let reason = "teacher-student agreement and mean confidence changed by less than 1.0 for 2 epochs in a row"
        XCTAssertEqual(epochs.last?.metrics["stop_reason"] as? String, reason)
        let tune = try XCTUnwrap(all.first { $0.stage == "tune" && $0.kind == "metrics" }).metrics
        XCTAssertEqual(tune["stopped_at_epoch"] as? Int, 3)
        XCTAssertEqual(tune["epochs_run"] as? Int, 3)
        XCTAssertEqual(tune["epochs"] as? Int, 10)
        XCTAssertEqual(tune["stop_reason"] as? String, reason)
        let labelled = try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1 AND label IS NOT NULL", [id])
        XCTAssertEqual(try labelled[0].int("n"), 18)
    }
}
