import Daemon
import Foundation
import Queue
import XCTest

/// The metrics listener's configuration, and `DaemonMetrics` fed through the worker's observer hooks.
final class MetricsConfigTests: XCTestCase {
    func testListener_isOffByDefault_andInTheExampleFile() throws {
        XCTAssertNil(NoladConfig().metricsListen)
        XCTAssertNil(try NoladConfig().metricsAddress())
        let example = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Config/nolad.example.yaml").path
        let c = try NoladConfig.load(path: example, environment: [:])
        XCTAssertNil(c.metricsListen)
        XCTAssertFalse(c.metricsAllowRemote)
    }

    func testLoopbackAddresses_parse() throws {
        func address(_ s: String) throws -> ListenAddress? {
            try NoladConfig.load(path: nil, environment: ["NOLAD_METRICS_LISTEN": s]).metricsAddress()
        }
        XCTAssertEqual(try address("127.0.0.1:9464")?.description, "127.0.0.1:9464")
        XCTAssertEqual(try address("localhost:9464")?.description, "127.0.0.1:9464")
        XCTAssertEqual(try address("127.1.2.3:80")?.description, "127.1.2.3:80")
        XCTAssertEqual(try address("[::1]:9464")?.description, "[::1]:9464")
        XCTAssertEqual(try address("[::1]:9464")?.family, .ipv6)
    }

    func testBadAddresses_areRefusedWithASentence() throws {
        let cases: [(String, String)] = [
            ("9464", "metrics_listen \"9464\" has no port; write host:port, e.g. 127.0.0.1:9464 or [::1]:9464"),
            ("127.0.0.1:0", "has port \"0\", which is not a number from 1 to 65535"),
            ("127.0.0.1:99999", "has port \"99999\", which is not a number from 1 to 65535"),
            ("127.0.0.1:http", "has port \"http\""),
            (":9464", "has no host (an empty host would listen on every interface)"),
            ("metrics.example:9464", "names the host \"metrics.example\", which is not an IP address or localhost"),
            ("::1:9464", "is an IPv6 address without brackets"),
            ("[::1:9464", "has an unclosed ["),
            ("0.0.0.0:9464", "metrics_listen 0.0.0.0:9464 is not a loopback address: the listener has no authentication or TLS"),
            ("192.0.2.7:9464", "Set metrics_allow_remote: true to listen on 192.0.2.7 anyway"),
            ("[::]:9464", "is not a loopback address"),
        ]
        for (value, message) in cases {
            XCTAssertThrowsError(try NoladConfig.load(path: nil, environment: ["NOLAD_METRICS_LISTEN": value]), value) { error in
                XCTAssertTrue("\(error)".contains(message), "\(value): expected \(message), got \(error)")
            }
        }
        XCTAssertThrowsError(try NoladConfig.load(path: nil, environment: ["NOLAD_METRICS_ALLOW_REMOTE": "maybe"])) { error in
            XCTAssertEqual("\(error)", "NOLAD_METRICS_ALLOW_REMOTE: metrics_allow_remote must be true or false, got \"maybe\"")
        }
    }

    func testQueueSampler_addsTimeouts_inTheConninfosOwnForm() {
        XCTAssertEqual(QueueSampler.withTimeouts("host=/run/postgresql dbname=nolad", seconds: 5),
                       "host=/run/postgresql dbname=nolad connect_timeout=5 keepalives=1 keepalives_idle=5 keepalives_interval=1 keepalives_count=5 tcp_user_timeout=5000")
        XCTAssertEqual(QueueSampler.withTimeouts("postgresql://db.internal/nolad", seconds: 5),
                       "postgresql://db.internal/nolad?connect_timeout=5&keepalives=1&keepalives_idle=5&keepalives_interval=1&keepalives_count=5&tcp_user_timeout=5000")
        XCTAssertEqual(QueueSampler.withTimeouts("postgres://h/n?sslmode=require&connect_timeout=2", seconds: 5),
                       "postgres://h/n?sslmode=require&connect_timeout=2&keepalives=1&keepalives_idle=5&keepalives_interval=1&keepalives_count=5&tcp_user_timeout=5000")
        XCTAssertEqual(QueueSampler.withTimeouts("", seconds: 3),
                       "connect_timeout=3 keepalives=1 keepalives_idle=3 keepalives_interval=1 keepalives_count=3 tcp_user_timeout=3000")
    }

    func testNonLoopback_isAccepted_withTheExplicitOverride() throws {
        let path = NSTemporaryDirectory() + "nolad-metrics-\(UUID().uuidString).yaml"
        try "metrics_listen: \"0.0.0.0:9464\"\nmetrics_allow_remote: true\n".write(toFile: path, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let c = try NoladConfig.load(path: path, environment: [:])
        XCTAssertEqual(try c.metricsAddress()?.description, "0.0.0.0:9464")
        XCTAssertEqual(try c.metricsAddress()?.isLoopback, false)
    }
}

final class DaemonMetricsTests: XCTestCase {
    /// The value of the sample `series` (exactly as exposed, labels included), or nil when absent.
    func value(_ series: String, _ exposition: String) -> Double? {
        for line in exposition.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1))
        }
        return nil
    }

    func text(_ m: DaemonMetrics, queue: DaemonMetrics.QueueSample? = nil) -> String {
        String(decoding: m.exposition(queue: queue, queueFailed: queue == nil), as: UTF8.self)
    }

    func testHooks_becomeSeries() {
        let m = DaemonMetrics(version: "9.9.9", concurrency: 2, livenessBound: 60)
        m.setWorkerID("w-1")
        let job = JobRef(id: 7, attempt: 1, worker: "w-1")
        m.jobStarted(job)
        m.jobProgress(job, stage: "discover", done: 0, total: 0)
        m.jobProgress(job, stage: "discover", done: 0, total: 4)
        m.jobProgress(job, stage: "discover", done: 3, total: 4)
        var t = text(m)
        XCTAssertEqual(value("nolad_build_info{version=\"9.9.9\"}", t), 1, t)
        XCTAssertEqual(value("nolad_worker_info{worker=\"w-1\"}", t), 1, t)
        XCTAssertEqual(value("nolad_worker_jobs_running", t), 1, t)
        XCTAssertEqual(value("nolad_worker_concurrency", t), 2, t)
        XCTAssertEqual(value("nolad_job_stage_done{job=\"7\",attempt=\"1\",stage=\"discover\"}", t), 3, t)
        XCTAssertEqual(value("nolad_job_stage_total{job=\"7\",attempt=\"1\",stage=\"discover\"}", t), 4, t)
        XCTAssertEqual(value("nolad_job_stage_progress_ratio{job=\"7\",attempt=\"1\",stage=\"discover\"}", t), 0.75, t)
        XCTAssertEqual(value("nolad_images_processed_total", t), 3, t)
        XCTAssertEqual(value("nolad_queue_sample_ok", t), 0, t)
        XCTAssertFalse(t.contains("nolad_queue_jobs"), t)

        m.jobProgress(job, stage: "discover", done: 4, total: 4)
        m.jobProgress(job, stage: "label", done: 0, total: 0)
        m.jobProgress(job, stage: "label", done: 2, total: 4) // resumed from a checkpoint: not processed now
        m.jobProgress(job, stage: "label", done: 4, total: 4)
        m.leaseRenewalFailed(job)
        m.jobEnded(job, outcome: .succeeded)
        m.jobEnded(JobRef(id: 8, attempt: 2, worker: "w-1"), outcome: nil)
        m.databaseUnavailable()
        m.databaseReconnected(tries: 3, seconds: 1.5)
        t = text(m, queue: .init(jobsByState: ["queued": 2, "running": 0, "succeeded": 1, "failed": 0, "cancelled": 0],
                                 notYetDue: 1, oldestDueSeconds: 12.5))
        XCTAssertEqual(value("nolad_worker_jobs_running", t), 0, t)
        XCTAssertFalse(t.contains("nolad_job_stage_done{"), "an ended job leaves no series: \(t)")
        XCTAssertEqual(value("nolad_images_processed_total", t), 4, t)
        XCTAssertEqual(value("nolad_stage_progress_total{stage=\"discover\"}", t), 4, t)
        XCTAssertEqual(value("nolad_stage_progress_total{stage=\"label\"}", t), 2, t)
        XCTAssertEqual(value("nolad_stage_duration_seconds_count{stage=\"discover\"}", t), 1, t)
        XCTAssertEqual(value("nolad_stage_duration_seconds_count{stage=\"label\"}", t), 1, t)
        XCTAssertEqual(value("nolad_attempts_total{outcome=\"succeeded\"}", t), 1, t)
        XCTAssertEqual(value("nolad_attempts_total{outcome=\"not_written\"}", t), 1, t)
        XCTAssertEqual(value("nolad_attempts_total{outcome=\"failed\"}", t), 0, t)
        XCTAssertEqual(value("nolad_lease_renewals_failed_total", t), 1, t)
        XCTAssertEqual(value("nolad_database_outages_total", t), 1, t)
        XCTAssertEqual(value("nolad_database_reconnects_total", t), 1, t)
        XCTAssertEqual(value("nolad_database_reconnect_failures_total", t), 3, t)
        XCTAssertEqual(value("nolad_queue_sample_ok", t), 1, t)
        XCTAssertEqual(value("nolad_queue_jobs{state=\"queued\"}", t), 2, t)
        XCTAssertEqual(value("nolad_queue_not_yet_due_jobs", t), 1, t)
        XCTAssertEqual(value("nolad_queue_oldest_due_age_seconds", t), 12.5, t)
        XCTAssertEqual(value("nolad_help_units_running{kind=\"tune\"}", t), 0, t)

        // Help units: running now by kind, and ended by kind and outcome.
        m.helpUnitStarted(kind: "tune")
        m.helpUnitStarted(kind: "tune")
        m.helpUnitStarted(kind: "label")
        t = text(m)
        XCTAssertEqual(value("nolad_help_units_running{kind=\"tune\"}", t), 2, t)
        XCTAssertEqual(value("nolad_help_units_running{kind=\"label\"}", t), 1, t)
        XCTAssertEqual(value("nolad_help_units_running{kind=\"encode\"}", t), 0, t)
        m.helpUnitEnded(kind: "tune", outcome: "done")
        m.helpUnitEnded(kind: "tune", outcome: "given_back")
        m.helpUnitEnded(kind: "label", outcome: "done")
        m.helpUnitStarted(kind: "tune")
        m.helpUnitEnded(kind: "tune", outcome: "done")
        t = text(m)
        XCTAssertEqual(value("nolad_help_units_running{kind=\"tune\"}", t), 0, t)
        XCTAssertEqual(value("nolad_help_units_running{kind=\"label\"}", t), 0, t)
        XCTAssertEqual(value("nolad_help_units_total{kind=\"tune\",outcome=\"done\"}", t), 2, t)
        XCTAssertEqual(value("nolad_help_units_total{kind=\"tune\",outcome=\"given_back\"}", t), 1, t)
        XCTAssertEqual(value("nolad_help_units_total{kind=\"label\",outcome=\"done\"}", t), 1, t)
        // Each family is declared once (two registries feed one exposition).
        let types = t.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }
        XCTAssertEqual(types.count, Set(types).count, t)
    }

    func testHealth_followsTheMainLoop_andReadiness_theDatabase() {
        let m = DaemonMetrics(version: "1", concurrency: 1, livenessBound: 10)
        XCTAssertTrue(m.liveness().ok, "connecting at startup counts as alive")
        XCTAssertFalse(m.readiness().ok)
        XCTAssertTrue(m.readiness().text.contains("schema has not been checked"))
        m.databaseReady()
        m.loopTurned()
        XCTAssertTrue(m.liveness().ok)
        XCTAssertTrue(m.readiness().ok)
        let stuck = m.liveness(now: Date().addingTimeInterval(11))
        XCTAssertFalse(stuck.ok)
        XCTAssertTrue(stuck.text.hasPrefix("main loop has not turned for 11"), stuck.text)
        m.databaseUnavailable()
        XCTAssertEqual(m.readiness().text, "not ready: the database is unavailable (retrying)")
        m.databaseReconnected(tries: 1, seconds: 0.2)
        XCTAssertTrue(m.readiness().ok)
    }
}

final class QueueSamplerTests: XCTestCase {
    /// A loopback port whose listen backlog completes TCP handshakes but that never answers a byte.
    func silentListener() throws -> (fd: Int32, port: Int) {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var a = sockaddr_in()
        a.sin_family = sa_family_t(AF_INET)
        a.sin_addr.s_addr = inet_addr("127.0.0.1")
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &a) { p in
            p.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) == 0 && listen(fd, 8) == 0 && getsockname(fd, $0, &len) == 0 }
        }
        XCTAssertTrue(ok)
        return (fd, Int(UInt16(bigEndian: a.sin_port)))
    }

    func testScrape_isAnsweredWithinTheBound_whenTheDatabaseNeverAnswers_andReadsDoNotPileUp() async throws {
        let (fd, port) = try silentListener()
        defer { close(fd) }
        let sampler = QueueSampler(conninfo: "host=127.0.0.1 port=\(port) user=nolad dbname=nolad")
        let started = Date()
        async let first = sampler.sample()
        try await Task.sleep(nanoseconds: 200_000_000)
        // While the first read hangs, a second scrape does not queue another behind it.
        let second = await sampler.sample()
        XCTAssertEqual("\(second)".contains("a previous read of the queue has not finished"), true, "\(second)")
        let result = await first
        let waited = Date().timeIntervalSince(started)
        guard case .failure(let error) = result else { return XCTFail("a server that never answers gave \(result)") }
        XCTAssertFalse("\(error)".contains("a previous read"), "libpq's connect_timeout ended the read, not the scrape's own wait: \(error)")
        XCTAssertLessThanOrEqual(waited, Double(QueueSampler.timeoutSeconds) + 3, "the read is bounded by its timeouts")
    }
}
