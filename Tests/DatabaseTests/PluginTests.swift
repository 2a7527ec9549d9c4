// The plug-in point of the pipeline: custom JobStages run by an in-process Worker.
import Daemon
import Foundation
import Logging
import Pipeline
import Queue
import XCTest

/// Fails transiently on the first attempt, refuses collections named "refuse" as bad input, otherwise
/// labels every image with the first class — using only the JobContext API the pipeline will use.
struct FlakyLabellingStage: JobStage {
    let name = "label"

    func run(_ context: JobContext) throws {
        if context.collection.lastPathComponent == "refuse" {
            throw JobError.badInput("class \"\(context.classes[0])\" has no descriptions")
        }
        if context.attempt == 1 { throw JobError.transient("model server busy") }
        let images = try context.withDatabase { try Results.images($0, jobID: context.jobID) }
        for i in images.indices {
            try context.reportProgress(stage: name, done: i + 1, total: images.count)
        }
        let labels = images.map {
            LabelRecord(path: $0.path, label: context.classes[0], confidence: 0.9, zeroShotLabel: context.classes[1], zeroShotConfidence: 0.6)
        }
        try context.write { try Results.insertLabels($0, context.job, labels) }
        try context.recordEvent(stage: name, kind: "metrics", metrics: ["images": .number(Double(images.count)), "seed": context.parameters["seed"] ?? .null])
    }
}

/// Records what the worker reports through its observer hooks (what the metrics plug into).
final class RecordingObserver: WorkerObserver, @unchecked Sendable {
    private let lock = NSLock()
    private(set) var started: [Int64] = []
    private(set) var ended: [Int64: [AttemptOutcome?]] = [:]
    private(set) var progress: [String] = []
    private(set) var turns = 0
    func jobStarted(_ job: JobRef) { lock.withLock { started.append(job.id) } }
    func jobEnded(_ job: JobRef, outcome: AttemptOutcome?) { lock.withLock { ended[job.id, default: []].append(outcome) } }
    func jobProgress(_ job: JobRef, stage: String, done: Int, total: Int) { lock.withLock { progress.append("\(job.id) \(stage) \(done)/\(total)") } }
    func loopTurned() { lock.withLock { turns += 1 } }
    func snapshot() -> (started: [Int64], ended: [Int64: [AttemptOutcome?]], progress: [String], turns: Int) {
        lock.withLock { (started, ended, progress, turns) }
    }
}

final class PluginTests: DatabaseTestCase {
    func testCustomStages_transientErrorRetriedWithBackoff_badInputFailsAtOnce() throws {
        var config = NoladConfig()
        config.database = conninfo
        config.collectionRoots = [root]
        config.leaseSeconds = 2
        config.heartbeatSeconds = 0.5
        config.pollSeconds = 0.5
        config.retryBaseSeconds = 0.3
        let observer = RecordingObserver()
        let worker = Worker(config: config, stages: [DiscoverImagesStage(), FlakyLabellingStage()], logger: Logger(label: "test"),
                            observer: observer)
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            do { try worker.run() } catch { XCTFail("worker: \(error)") }
            done.signal()
        }
        thread.start()
        defer {
            worker.requestShutdown()
            XCTAssertEqual(done.wait(timeout: .now() + 10), .success, "worker did not stop")
        }

        let flaky = try db.query("INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, '{cat,dog}', '{\"seed\": 7}') RETURNING id",
                                 [try makeCollection("pets", images: 5)])[0].int("id")
        let refused = try submit(try makeCollection("refuse", images: 2))

        let row = try waitState(Int64(flaky), ["succeeded", "failed"], timeout: 20)
        XCTAssertEqual(try row.string("state"), "succeeded")
        XCTAssertEqual(try row.int("attempt"), 2)
        let attempts = try db.query("SELECT outcome, error FROM nola.attempts WHERE job_id = $1 ORDER BY attempt", [flaky])
        XCTAssertEqual(try attempts.rows.map { try $0.string("outcome") }, ["retry", "succeeded"])
        XCTAssertEqual(try attempts[0].optionalString("error"), "model server busy")
        let retry = try db.query("SELECT (metrics->>'retry_in_s')::float8 AS s FROM nola.events WHERE job_id = $1 AND kind = 'retry_scheduled'", [flaky])
        XCTAssertEqual(retry.count, 1)
        let delay = try retry[0].double("s")
        XCTAssertTrue(delay > 0.3 * 0.8 - 1e-9 && delay <= 0.3, "first retry after base delay with jitter: \(delay)")
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1 AND label = 'cat'", [flaky])[0].int("n"), 5)
        let stages = try db.query("SELECT stage FROM nola.events WHERE job_id = $1 AND attempt = 2 AND kind = 'stage_started' ORDER BY id", [flaky])
        XCTAssertEqual(try stages.rows.map { try $0.string("stage") }, ["discover", "label"])
        XCTAssertEqual(try db.query("SELECT metrics->>'seed' AS s FROM nola.events WHERE job_id = $1 AND stage = 'label' AND kind = 'metrics'", [flaky])[0].string("s"), "7")

        let bad = try waitState(refused, ["succeeded", "failed"], timeout: 20)
        XCTAssertEqual(try bad.string("state"), "failed")
        XCTAssertEqual(try bad.optionalString("error"), "class \"cat\" has no descriptions")
        XCTAssertEqual(try bad.int("attempt"), 1)

        // The observer hooks saw each attempt start and end with the outcome written.
        try waitUntil("the observer saw three attempts end", timeout: 5) { observer.snapshot().ended.values.map(\.count).reduce(0, +) == 3 }
        let seen = observer.snapshot()
        XCTAssertEqual(seen.started.sorted(), [Int64(flaky), Int64(flaky), refused].sorted())
        XCTAssertEqual(seen.ended[Int64(flaky)], [.retry, .succeeded])
        XCTAssertEqual(seen.ended[refused], [.failed])
        XCTAssertTrue(seen.progress.contains("\(flaky) label 5/5"), "\(seen.progress)")
        XCTAssertGreaterThan(seen.turns, 0)
    }
}
