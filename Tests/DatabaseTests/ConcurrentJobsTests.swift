// Two labelling jobs at once in one daemon (`concurrency: 2`) with different `threads`: each gets its own
// thread count, and neither changes the other's results (docs/threading.md).
import Foundation
import Models
import Queue
import XCTest

final class ConcurrentJobsTests: DatabaseTestCase {
    static let classes = ["red ball", "green leaf", "blue sky"]

    /// The fixture collection under the root; with `distinct`, every file gets trailing bytes after its
    /// image data (decoders stop at the end of the image), so its SHA-256 and thus its feature-cache
    /// entries are its own and the two jobs cannot read each other's cached features.
    func collection(_ name: String, distinct: Bool) throws -> String {
        let path = root + "/" + name
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: path)
        if distinct {
            let files = FileManager.default.enumerator(atPath: path)!.compactMap { $0 as? String }
            for file in files where file.hasSuffix(".jpg") || file.hasSuffix(".png") {
                let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path + "/" + file))
                try handle.seekToEnd()
                try handle.write(contentsOf: Data("trailing bytes of \(name)".utf8))
                try handle.close()
            }
        }
        return path
    }

    func submitJob(_ collection: String, parameters: String) throws -> Int64 {
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, max_attempts) VALUES ($1, $2, $3::jsonb, 1) RETURNING id
            """, [collection, Self.classes, parameters])
        return Int64(try rows[0].int("id"))
    }

    /// Everything a job produced: each image's label, confidence and zero-shot label, and the tuned tensors.
    struct Result: Equatable {
        var labels: [String]
        var prompts: [String: [Float]]
    }

    func result(_ id: Int64) throws -> Result {
        let rows = try db.query("""
            SELECT path, coalesce(label, '') AS label, coalesce(confidence::text, '') AS confidence,
                   coalesce(zero_shot_label, '') AS zs, coalesce(unreadable, '') AS unreadable
            FROM nola.labels WHERE job_id = $1 ORDER BY path
            """, [id])
        // real/float8 text output is shortest-exact (extra_float_digits defaults to 1): equal text is equal bits.
        let labels = try rows.rows.map { row in
            [try row.string("path"), try row.string("label"), try row.string("confidence"), try row.string("zs"),
             try row.string("unreadable").isEmpty ? "" : "unreadable"].joined(separator: " | ")
        }
        let blob = try db.query("SELECT safetensors FROM nola.prompts WHERE job_id = $1", [id])
        XCTAssertEqual(blob.count, 1, "job \(id) stored its tuned prompts")
        let path = root + "/prompts-\(id).safetensors"
        _ = FileManager.default.createFile(atPath: path, contents: Data(try blob[0].bytes("safetensors")))
        let file = try SafeTensorsFile(path: path)
        var prompts: [String: [Float]] = [:]
        for name in file.tensorNames { prompts[name] = try file.floats(name) }
        return Result(labels: labels, prompts: prompts)
    }

    func eventTimes(_ id: Int64, kind: String? = nil) throws -> [Double] {
        let rows = try db.query("""
            SELECT extract(epoch FROM at)::float8 AS t FROM nola.events WHERE job_id = $1 AND ($2::text IS NULL OR kind = $2) ORDER BY id
            """, [id, kind])
        return try rows.rows.map { try $0.double("t") }
    }

    func testTwoJobsAtOnce_withThreads1And2_eachEqualsItsRunAlone_andKeepsItsThreads() throws {
        let a = try collection("shapes-a", distinct: false), b = try collection("shapes-b", distinct: true)
        let daemon = try startDaemon("threads", settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2", "concurrency": "2", "checkpoint_seconds": "60"])
        let parametersA = #"{"prompt_epochs": 12, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 3, "threads": 1}"#
        let parametersB = #"{"prompt_epochs": 12, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 5, "threads": 2}"#

        // At once: both claimed by the one daemon, both tuning while the other is still at work.
        let jobA = try submitJob(a, parameters: parametersA), jobB = try submitJob(b, parameters: parametersB)
        try waitSucceeded(jobA, timeout: 300)
        try waitSucceeded(jobB, timeout: 300)
        let timesA = try eventTimes(jobA), timesB = try eventTimes(jobB)
        let tuneA = try eventTimes(jobA, kind: "epoch"), tuneB = try eventTimes(jobB, kind: "epoch")
        XCTAssertEqual(tuneA.count, 12)
        XCTAssertEqual(tuneB.count, 12)
        // The epochs of the two jobs interleave: each finished an epoch while the other was between epochs.
        XCTAssertLessThan(max(tuneA.first ?? .infinity, tuneB.first ?? .infinity), min(tuneA.last ?? 0, tuneB.last ?? 0),
                          "both jobs were tuning at the same time")
        XCTAssertLessThan(max(timesA.first ?? .infinity, timesB.first ?? .infinity), min(timesA.last ?? 0, timesB.last ?? 0))
        let togetherA = try result(jobA), togetherB = try result(jobB)

        // Alone, one after the other, with the feature cache emptied so each computes its features again.
        try db.query("DELETE FROM nola.feature_cache")
        let aloneA = try submitJob(a, parameters: parametersA)
        try waitSucceeded(aloneA, timeout: 300)
        try db.query("DELETE FROM nola.feature_cache")
        let aloneB = try submitJob(b, parameters: parametersB)
        try waitSucceeded(aloneB, timeout: 300)

        // Bit-identical: every label, confidence and zero-shot label, and every tuned tensor.
        let resultAloneA = try result(aloneA), resultAloneB = try result(aloneB)
        XCTAssertEqual(togetherA.labels.count, 19)
        XCTAssertEqual(togetherA.labels, resultAloneA.labels)
        XCTAssertEqual(togetherB.labels, resultAloneB.labels)
        XCTAssertEqual(togetherA.prompts, resultAloneA.prompts)
        XCTAssertEqual(togetherB.prompts, resultAloneB.prompts)
        XCTAssertFalse(togetherA.prompts.isEmpty)

        // Nor does the thread count change a result (docs/threading.md): job A's inputs with 2 threads, alone.
        try db.query("DELETE FROM nola.feature_cache")
        let twoThreads = try submitJob(a, parameters: parametersA.replacingOccurrences(of: #""threads": 1"#, with: #""threads": 2"#))
        try waitSucceeded(twoThreads, timeout: 300)
        let resultTwo = try result(twoThreads)
        let differing = zip(resultTwo.labels, resultAloneA.labels).filter { $0 != $1 }
        for (two, one) in differing.prefix(3) { print("  threads 2: \(two)\n  threads 1: \(one)") }
        XCTAssertEqual(differing.count, 0, "label rows that differ between threads 1 and 2")
        XCTAssertEqual(resultTwo.prompts, resultAloneA.prompts, "tuned tensors with threads 1 and 2")

        // Each job ran with the threads it asked for, and OpenBLAS stayed at one thread after every job.
        for (id, threads) in [(jobA, 1), (jobB, 2), (aloneA, 1), (aloneB, 2), (twoThreads, 2)] {
            let parameters = try XCTUnwrap(try events(id, kind: "parameters").first?.metrics)
            XCTAssertEqual(parameters["threads"] as? Int, threads, "job \(id)")
            XCTAssertEqual(parameters["threads_requested"] as? Int, threads, "job \(id)")
            XCTAssertEqual(parameters["daemon_threads"] as? Int, 2, "job \(id)")
            let used = try XCTUnwrap(try events(id, kind: "threads").last?.metrics, "job \(id) recorded its threads")
            XCTAssertEqual(used["threads"] as? Int, threads, "job \(id)")
            XCTAssertEqual(used["blas_threads"] as? Int, 1, "job \(id)")
        }
        let log = daemon.log
        XCTAssertTrue(log.contains("job threads") && log.contains("threads=1") && log.contains("threads=2"), log)
    }

    /// A job asking for more threads than the daemon gives runs with the daemon's `threads`, and says so.
    func testJobAskingForMoreThreadsThanConfigured_runsWithTheDaemonsThreads() throws {
        let a = try collection("shapes", distinct: false)
        _ = try startDaemon("capped", settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2"])
        let id = try submitJob(a, parameters: #"{"prompt_epochs": 1, "prompt_batch_size": 8, "alignment_epochs": 1, "min_k": 2, "threads": 64}"#)
        try waitSucceeded(id, timeout: 300)
        let parameters = try XCTUnwrap(try events(id, kind: "parameters").first?.metrics)
        XCTAssertEqual(parameters["threads"] as? Int, 2)
        XCTAssertEqual(parameters["threads_requested"] as? Int, 64)
        XCTAssertEqual(try events(id, kind: "threads").last?.metrics["threads"] as? Int, 2)
        // Out of range is refused at INSERT with the allowed values.
        XCTAssertThrowsError(try submitJob(a, parameters: #"{"threads": 0}"#)) { error in
            XCTAssertTrue("\(error)".contains("parameter \"threads\" must be an integer from 1 to 1024, got 0"), "\(error)")
        }
    }
}
