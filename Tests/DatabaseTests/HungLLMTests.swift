import Foundation
import Queue
import XCTest

/// An "LLM endpoint" on loopback that accepts connections and never answers (it never reads either;
/// the request sits in the socket buffer). Counts the connections it accepted.
final class SilentEndpoint: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private let lock = NSLock()
    private var accepted: [Int32] = []
    private let ended = DispatchSemaphore(value: 0)
    var connections: Int { lock.withLock { accepted.count } }
    var url: String { "http://127.0.0.1:\(port)/v1" }

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        listener = fd
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard fd >= 0, bound == 0, listen(fd, 16) == 0 else { throw TestSetupError("silent endpoint: cannot bind/listen") }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        port = UInt16(bigEndian: address.sin_port)
        Thread { [self] in
            defer { ended.signal() }
            while true {
                let client = accept(fd, nil, nil)
                if client < 0 { return }
                lock.withLock { accepted.append(client) }
            }
        }.start()
    }

    func stop() {
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
        ended.wait()
        lock.withLock { for fd in accepted { close(fd) } }
    }
}

/// `llm_url` pointing at an endpoint that accepts connections and never answers: the describe stage's wait
/// must end at once on a cancel, the job's timeout and SIGTERM, and cost the daemon no CPU while it lasts.
final class HungLLMTests: DatabaseTestCase {
    var endpoint: SilentEndpoint!

    override func setUpWithError() throws {
        try super.setUpWithError()
        endpoint = try SilentEndpoint()
    }

    override func tearDownWithError() throws {
        try super.tearDownWithError()
        endpoint?.stop()
    }

    func startDaemonWithHungLLM(_ name: String = "hung-llm") throws -> DaemonProcess {
        try startDaemon(name, settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2",
            "llm_url": endpoint.url, "llm_model": "silent-1",
        ])
    }

    func submitLabelling(timeout: String) throws -> Int64 {
        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, timeout, max_attempts)
            VALUES ($1, $2, '{"prompt_epochs": 1, "alignment_epochs": 1, "min_k": 2}'::jsonb, $3::interval, 3) RETURNING id
            """, [collection, ["red ball", "green leaf", "blue sky"], timeout])
        return Int64(try rows[0].int("id"))
    }

    /// Waits until the job runs its describe stage and the daemon has connected to the endpoint.
    func waitStuckInDescribe(_ id: Int64) throws {
        try waitUntil("job \(id) waits for the LLM endpoint", timeout: 120, poll: 0.05) {
            let stage = try db.query("SELECT stage FROM nola.jobs WHERE id = $1", [id])[0].optionalString("stage")
            return stage == "describe" && endpoint.connections > 0
        }
    }

    /// utime + stime of a process, in seconds (/proc/PID/stat fields 14 and 15).
    func cpuSeconds(_ pid: Int32) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        // The command name (field 2) is in parentheses and may hold spaces; fields after it are plain.
        let fields = stat[stat.index(after: stat.lastIndex(of: ")")!)...].split(separator: " ")
        let ticks = Double(fields[11])! + Double(fields[12])!
        return ticks / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    func testJobTimeout_whileTheLLMNeverAnswers_failsAtTheTimeout_withAnErrorNamingTheEndpoint() throws {
        _ = try startDaemonWithHungLLM()
        let id = try submitLabelling(timeout: "6 seconds")
        try waitStuckInDescribe(id)
        let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 40)
        XCTAssertEqual(try row.string("state"), "failed")
        XCTAssertEqual(try row.optionalString("error"),
                       "timed out after 6 s (the job's timeout) while waiting for the LLM endpoint \(endpoint.url) to describe class 'red ball'")
        let timing = try db.query("""
            SELECT extract(epoch FROM finished_at - started_at)::float8 AS s, outcome::text AS o
            FROM nola.attempts WHERE job_id = $1 ORDER BY attempt
            """, [id])
        XCTAssertEqual(timing.count, 1)
        XCTAssertEqual(try timing[0].string("o"), "timed_out")
        let seconds = try timing[0].double("s")
        print("hung LLM: a job with a 6 s timeout failed after \(String(format: "%.1f", seconds)) s")
        // The request's own timeout is 60 s; the job's 6 s must end it (with room for a loaded machine).
        XCTAssertLessThan(seconds, 6 + 8)
    }

    func testCancel_whileWaitingForTheLLM_cancelsTheJobPromptly() throws {
        let daemon = try startDaemonWithHungLLM()
        let id = try submitLabelling(timeout: "1 hour")
        try waitStuckInDescribe(id)
        let start = Date()
        _ = try db.query("SELECT nola.cancel($1)", [id])
        let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 40)
        let seconds = Date().timeIntervalSince(start)
        print("hung LLM: cancelled \(String(format: "%.2f", seconds)) s after nola.cancel")
        XCTAssertEqual(try row.string("state"), "cancelled")
        XCTAssertLessThan(seconds, 10, "the 60 s request ends at the cancel")
        XCTAssertTrue(daemon.log.contains("stopped while waiting for the LLM endpoint"), daemon.log)
        XCTAssertNil(daemon.waitExit(timeout: 0), "the daemon keeps serving")
    }

    func testSigterm_whileWaitingForTheLLM_releasesTheJobPromptly() throws {
        let daemon = try startDaemonWithHungLLM()
        let id = try submitLabelling(timeout: "1 hour")
        try waitStuckInDescribe(id)
        let start = Date()
        daemon.signal(SIGTERM)
        // Tests run with shutdown_timeout_seconds 5: a daemon that could not stop the wait would give up
        // on the job after 5 s and exit without releasing it.
        XCTAssertEqual(daemon.waitExit(timeout: 30), 0, "the daemon exits cleanly after SIGTERM")
        let seconds = Date().timeIntervalSince(start)
        print("hung LLM: exited \(String(format: "%.2f", seconds)) s after SIGTERM")
        XCTAssertLessThan(seconds, 4.5)
        let released = try job(id)
        XCTAssertEqual(try released.string("state"), "queued", "the job is released for another worker")
        XCTAssertEqual(try released.int("attempts_used"), 0, "a release does not burn an attempt")
    }

    func testDaemonCPU_whileWaitingForTheLLM_staysNearZero() throws {
        let daemon = try startDaemonWithHungLLM()
        let id = try submitLabelling(timeout: "1 hour")
        try waitStuckInDescribe(id)
        let cpuBefore = try cpuSeconds(daemon.pid)
        let start = Date()
        Thread.sleep(forTimeInterval: 10)
        let used = try cpuSeconds(daemon.pid) - cpuBefore
        let wall = Date().timeIntervalSince(start)
        print("hung LLM: daemon used \(String(format: "%.2f", used)) CPU-s over \(String(format: "%.1f", wall)) s of waiting")
        XCTAssertEqual(try db.query("SELECT state::text AS s FROM nola.jobs WHERE id = $1", [id])[0].string("s"), "running",
                       "still waiting, so the figure is of the wait")
        // A spinning HTTP client uses about one CPU-second per wall second; waiting in poll() uses next to none
        // (the main loop's heartbeats included). A bound on spinning, not a speed benchmark.
        XCTAssertLessThan(used, 1.0, "CPU-seconds of the daemon over 10 s of waiting")
        _ = try db.query("SELECT nola.cancel($1)", [id])
        XCTAssertEqual(try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 40).string("state"), "cancelled")
    }
}
