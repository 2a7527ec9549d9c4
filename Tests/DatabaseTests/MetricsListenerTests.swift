// The metrics listener of a real `nolad serve`: scraped with URLSession after a real job, and its
// readiness while the real PostgreSQL is stopped.
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Queue
import XCTest

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed).
func freeLoopbackPort() throws -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { throw TestSetupError("socket failed") }
    defer { close(fd) }
    var a = sockaddr_in()
    a.sin_family = sa_family_t(AF_INET)
    a.sin_addr.s_addr = inet_addr("127.0.0.1")
    a.sin_port = 0
    var len = socklen_t(MemoryLayout<sockaddr_in>.size)
    let bound = withUnsafeMutablePointer(to: &a) { p in
        p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && getsockname(fd, $0, &len) == 0 }
    }
    guard bound else { throw TestSetupError("cannot bind a loopback port") }
    return Int(UInt16(bigEndian: a.sin_port))
}

struct HTTPReply {
    let status: Int
    let body: String
    let contentType: String?
}

/// One GET with URLSession, waited for (10 s at most).
func httpGet(_ url: String) throws -> HTTPReply {
    var request = URLRequest(url: URL(string: url)!)
    request.timeoutInterval = 10
    let done = DispatchSemaphore(value: 0)
    nonisolated(unsafe) var reply: Result<HTTPReply, Error> = .failure(TestSetupError("no answer from \(url)"))
    URLSession.shared.dataTask(with: request) { data, response, error in
        if let error {
            reply = .failure(error)
        } else if let http = response as? HTTPURLResponse {
            reply = .success(HTTPReply(status: http.statusCode, body: String(decoding: data ?? Data(), as: UTF8.self),
                                       contentType: http.value(forHTTPHeaderField: "Content-Type")))
        }
        done.signal()
    }.resume()
    guard done.wait(timeout: .now() + 15) == .success else { throw TestSetupError("GET \(url) did not finish") }
    return try reply.get()
}

/// The value of the sample `series` (name with its labels, exactly as exposed), or nil when absent.
func sample(_ series: String, in exposition: String) -> Double? {
    for line in exposition.split(separator: "\n") where line.hasPrefix(series + " ") {
        return Double(line.dropFirst(series.count + 1).split(separator: " ")[0])
    }
    return nil
}

final class MetricsListenerTests: DatabaseTestCase {
    func testMetrics_afterARealJob_haveTheQueueAttemptsImagesAndBuildInfo() throws {
        let port = try freeLoopbackPort()
        let base = "http://127.0.0.1:\(port)"
        // Discovery pauses 0.3 s per image, so the running job can be seen in a scrape.
        let daemon = try startDaemon("metrics", settings: ["metrics_listen": "127.0.0.1:\(port)", "image_delay_seconds": "0.3"])
        XCTAssertTrue(daemon.log.contains("metrics listener ready"), daemon.log)

        let health = try httpGet(base + "/healthz")
        XCTAssertEqual(health.status, 200, health.body)
        XCTAssertTrue(health.body.hasPrefix("ok: main loop turned"), health.body)
        let ready = try httpGet(base + "/readyz")
        XCTAssertEqual(ready.status, 200, ready.body)
        XCTAssertEqual(ready.body, "ready: database connected, schema checked\n")
        XCTAssertEqual(try httpGet(base + "/nothing").status, 404)

        let collection = try makeCollection("pets", images: 5)
        let id = try submit(collection)
        let series = "{job=\"\(id)\",attempt=\"1\",stage=\"discover\"}"
        var running = ""
        try waitUntil("a scrape shows the job running", timeout: 20, poll: 0.05) {
            running = try httpGet(base + "/metrics").body
            return sample("nolad_job_stage_done" + series, in: running).map { $0 >= 1 } ?? false
        }
        XCTAssertEqual(sample("nolad_worker_jobs_running", in: running), 1, running)
        XCTAssertEqual(sample("nolad_job_stage_total" + series, in: running), 5, running)
        let ratio = try XCTUnwrap(sample("nolad_job_stage_progress_ratio" + series, in: running), running)
        XCTAssertTrue(ratio > 0 && ratio <= 1, running)
        XCTAssertEqual(sample("nolad_queue_jobs{state=\"running\"}", in: running), 1, running)
        XCTAssertEqual(try waitState(id, ["succeeded", "failed"], timeout: 30).string("state"), "succeeded")
        // A job that is queued but not due yet (a retry in backoff looks the same).
        try db.query("INSERT INTO nola.jobs (collection, classes, run_after) VALUES ($1, $2, now() + interval '1 hour')",
                     [collection, ["cat", "dog"]])

        var scrape = HTTPReply(status: 0, body: "", contentType: nil)
        try waitUntil("the scrape shows the job's attempt", timeout: 10, poll: 0.1) {
            scrape = try httpGet(base + "/metrics")
            return sample("nolad_attempts_total{outcome=\"succeeded\"}", in: scrape.body) == 1
        }
        let t = scrape.body
        XCTAssertEqual(scrape.status, 200)
        XCTAssertEqual(scrape.contentType, "text/plain; version=0.0.4; charset=utf-8")
        XCTAssertTrue(t.contains("# TYPE nolad_attempts_total counter"), t)
        XCTAssertEqual(sample("nolad_attempts_total{outcome=\"failed\"}", in: t), 0, t)
        XCTAssertEqual(sample("nolad_images_processed_total", in: t), 5, t)
        XCTAssertEqual(sample("nolad_stage_progress_total{stage=\"discover\"}", in: t), 5, t)
        XCTAssertTrue(t.contains("# TYPE nolad_stage_duration_seconds histogram"), t)
        XCTAssertEqual(sample("nolad_stage_duration_seconds_count{stage=\"discover\"}", in: t), 1, t)
        XCTAssertEqual(sample("nolad_stage_duration_seconds_bucket{stage=\"discover\",le=\"+Inf\"}", in: t), 1, t)
        XCTAssertEqual(sample("nolad_build_info{version=\"\(try noladVersionOfExecutable())\"}", in: t), 1, t)
        XCTAssertTrue(t.contains("nolad_worker_info{worker=\"metrics-\(daemon.pid)-"), t)
        XCTAssertEqual(sample("nolad_worker_jobs_running", in: t), 0, t)
        XCTAssertNil(sample("nolad_job_stage_done" + series, in: t), "an ended job leaves no series")
        XCTAssertEqual(sample("nolad_worker_concurrency", in: t), 1, t)
        XCTAssertEqual(sample("nolad_queue_sample_ok", in: t), 1, t)
        XCTAssertEqual(sample("nolad_queue_jobs{state=\"succeeded\"}", in: t), 1, t)
        XCTAssertEqual(sample("nolad_queue_jobs{state=\"queued\"}", in: t), 1, t)
        XCTAssertEqual(sample("nolad_queue_jobs{state=\"running\"}", in: t), 0, t)
        XCTAssertEqual(sample("nolad_queue_jobs{state=\"failed\"}", in: t), 0, t)
        XCTAssertEqual(sample("nolad_queue_not_yet_due_jobs", in: t), 1, t)
        XCTAssertEqual(sample("nolad_queue_oldest_due_age_seconds", in: t), 0, t)
        XCTAssertEqual(sample("nolad_database_connected", in: t), 1, t)
        XCTAssertEqual(sample("nolad_database_reconnects_total", in: t), 0, t)
        XCTAssertEqual(sample("nolad_lease_renewals_failed_total", in: t), 0, t)
        let age = try XCTUnwrap(sample("nolad_main_loop_last_turn_age_seconds", in: t), t)
        XCTAssertLessThan(age, 2, "the main loop turns at least every heartbeat (0.5 s) here")

        // A job that waits: the oldest due job's age grows from its run_after.
        try db.query("INSERT INTO nola.jobs (collection, classes, run_after) VALUES ($1, $2, now() - interval '1 minute')",
                     [root + "/missing", ["cat", "dog"]])
        let later = try httpGet(base + "/metrics").body
        // The daemon may already have claimed it; if not, it has waited about 60 s.
        if sample("nolad_queue_jobs{state=\"queued\"}", in: later) == 2 {
            XCTAssertGreaterThanOrEqual(sample("nolad_queue_oldest_due_age_seconds", in: later) ?? 0, 59, later)
        }
    }

    func testReadyz_is503_whileTheDatabaseIsStopped_andHealthzStays200() throws {
        let port = try freeLoopbackPort()
        let base = "http://127.0.0.1:\(port)"
        _ = try startDaemon("ready", settings: ["metrics_listen": "localhost:\(port)"])
        XCTAssertEqual(try httpGet(base + "/readyz").status, 200)

        db.close()
        try cluster.serverTool("pg_ctl", ["-D", cluster.dataDir, "-m", "fast", "-w", "-t", "30", "stop"])
        var restarted = false
        defer { if !restarted { try? cluster.start() } }

        var reply = HTTPReply(status: 0, body: "", contentType: nil)
        try waitUntil("/readyz answers 503", timeout: 15, poll: 0.1) {
            reply = try httpGet(base + "/readyz")
            return reply.status == 503
        }
        XCTAssertEqual(reply.body, "not ready: the database is unavailable (retrying)\n")
        let health = try httpGet(base + "/healthz")
        XCTAssertEqual(health.status, 200, "the main loop keeps turning while it retries: \(health.body)")
        let down = try httpGet(base + "/metrics")
        XCTAssertEqual(down.status, 200)
        XCTAssertEqual(sample("nolad_queue_sample_ok", in: down.body), 0, down.body)
        XCTAssertEqual(sample("nolad_database_connected", in: down.body), 0, down.body)
        XCTAssertNil(sample("nolad_queue_jobs{state=\"queued\"}", in: down.body), "no stale queue figures: \(down.body)")
        XCTAssertEqual(sample("nolad_database_outages_total", in: down.body), 1, down.body)

        try cluster.start()
        restarted = true
        db = try PostgresConnection(conninfo: conninfo)
        try waitUntil("/readyz answers 200 again", timeout: 20, poll: 0.1) { try httpGet(base + "/readyz").status == 200 }
        let up = try httpGet(base + "/metrics").body
        XCTAssertEqual(sample("nolad_database_reconnects_total", in: up), 1, up)
        XCTAssertEqual(sample("nolad_queue_sample_ok", in: up), 1, up)
        XCTAssertEqual(sample("nolad_database_connected", in: up), 1, up)
    }

    func testServe_refusesANonLoopbackAddress_andABusyPort_withASentence() throws {
        let open = try startDaemon("open", settings: ["metrics_listen": "0.0.0.0:9464"], waitReady: false)
        XCTAssertEqual(open.waitExit(timeout: 20), 1)
        XCTAssertTrue(open.log.contains("nolad: metrics_listen 0.0.0.0:9464 is not a loopback address"), open.log)
        XCTAssertTrue(open.log.contains("Set metrics_allow_remote: true"), open.log)

        let port = try freeLoopbackPort()
        let first = try startDaemon("first", settings: ["metrics_listen": "127.0.0.1:\(port)"])
        let second = try startDaemon("second", settings: ["metrics_listen": "127.0.0.1:\(port)"], waitReady: false)
        XCTAssertEqual(second.waitExit(timeout: 20), 1)
        XCTAssertTrue(second.log.contains("nolad: cannot listen on 127.0.0.1:\(port) (metrics_listen): the address is already in use"), second.log)
        XCTAssertEqual(try httpGet("http://127.0.0.1:\(port)/healthz").status, 200, first.log)
    }
}

/// The version `nolad --version` prints.
func noladVersionOfExecutable() throws -> String {
    let (status, output) = try runProgram(try noladExecutable(), ["--version"])
    guard status == 0 else { throw TestSetupError("nolad --version failed: \(output)") }
    return output.trimmingCharacters(in: .whitespacesAndNewlines)
}
