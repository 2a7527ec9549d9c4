// A silent network partition between the daemon and PostgreSQL: a loopback TCP proxy (threads and POSIX
// sockets) in front of the cluster's Unix socket that can stop forwarding without closing anything.
import Foundation
import Queue
import XCTest

/// Listens on 127.0.0.1 and forwards each connection to a Unix socket. `pause()` stops forwarding in both
/// directions while every socket stays open, so the daemon's kernel sees its packets acknowledged and
/// nothing come back (no RST, no FIN): what a dropped link looks like to an application. `resume()`
/// forwards again, what was held included; new connections are accepted all along but forwarded only then.
final class PartitionProxy: @unchecked Sendable {
    let port: UInt16
    private let listener: Int32
    private let upstream: String
    private let lock = NSLock()
    private var forwarding = true
    private var stopped = false
    private var acceptedCount = 0
    private var sockets: Set<Int32> = []

    init(upstreamSocket: String) throws {
        upstream = upstreamSocket
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestSetupError("proxy: socket failed") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0, listen(fd, 64) == 0 else { close(fd); throw TestSetupError("proxy: cannot bind/listen on 127.0.0.1") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        port = UInt16(bigEndian: address.sin_port)
        listener = fd
        let thread = Thread { [self] in acceptLoop() }
        thread.start()
    }

    /// Connections accepted so far.
    var accepted: Int { lock.withLock { acceptedCount } }
    func pause() { lock.withLock { forwarding = false } }
    func resume() { lock.withLock { forwarding = true } }

    func stop() {
        let open: [Int32] = lock.withLock {
            stopped = true
            return Array(sockets)
        }
        shutdown(listener, Int32(SHUT_RDWR))
        for fd in open { shutdown(fd, Int32(SHUT_RDWR)) }
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 {
                if errno == EINTR { continue }
                break
            }
            let server = connectUnix(upstream)
            let ok: Bool = lock.withLock {
                guard !stopped, server >= 0 else { return false }
                acceptedCount += 1
                sockets.insert(client)
                sockets.insert(server)
                return true
            }
            guard ok else {
                close(client)
                if server >= 0 { close(server) }
                continue
            }
            let pair = Pair(client, server) { [self] in
                lock.withLock { sockets.remove(client); sockets.remove(server) }
            }
            Thread { [self] in pump(from: client, to: server, pair) }.start()
            Thread { [self] in pump(from: server, to: client, pair) }.start()
        }
        close(listener)
    }

    private func pump(from: Int32, to: Int32, _ pair: Pair) {
        var buffer = [UInt8](repeating: 0, count: 65536)
        copying: while true {
            let (go, stop) = lock.withLock { (forwarding, stopped) }
            if stop { break }
            if !go {
                // Partitioned: read nothing, send nothing, close nothing.
                usleep(10_000)
                continue
            }
            var p = pollfd(fd: from, events: Int16(POLLIN), revents: 0)
            let ready = poll(&p, 1, 20)
            if ready == 0 || (ready < 0 && errno == EINTR) { continue }
            if ready < 0 { break }
            if !lock.withLock({ forwarding }) { continue } // a pause that began during the poll holds
            let n = read(from, &buffer, buffer.count)
            if n <= 0 { break }
            var sent = 0
            while sent < n {
                let w = buffer.withUnsafeBytes { send(to, $0.baseAddress! + sent, n - sent, Int32(MSG_NOSIGNAL)) }
                if w < 0 && errno == EINTR { continue }
                if w <= 0 { break copying }
                sent += w
            }
        }
        pair.pumpEnded()
    }

    /// The two sockets of one forwarded connection: the first pump to end shuts both down (which ends
    /// the other), the second closes them.
    private final class Pair: @unchecked Sendable {
        let a: Int32, b: Int32
        let forget: () -> Void
        private let lock = NSLock()
        private var ended = 0
        init(_ a: Int32, _ b: Int32, forget: @escaping () -> Void) {
            self.a = a
            self.b = b
            self.forget = forget
        }
        func pumpEnded() {
            let count: Int = lock.withLock { ended += 1; return ended }
            if count == 1 {
                shutdown(a, Int32(SHUT_RDWR))
                shutdown(b, Int32(SHUT_RDWR))
            } else {
                forget()
                close(a)
                close(b)
            }
        }
    }
}

/// A stream connection to a Unix socket, or -1.
func connectUnix(_ path: String) -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return -1 }
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        for (i, b) in path.utf8.enumerated() where i < raw.count - 1 { raw[i] = b }
    }
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    if rc != 0 { close(fd); return -1 }
    return fd
}

/// A datagram socket standing in for systemd's NOTIFY_SOCKET that records when each line arrived.
final class NotifyListener: @unchecked Sendable {
    let path: String
    private let fd: Int32
    private let lock = NSLock()
    private var received: [(at: Date, line: String)] = []
    private var stopped = false

    init(path: String) throws {
        self.path = path
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw TestSetupError("notify: socket failed") }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in path.utf8.enumerated() { raw[i] = b }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard bound == 0 else { throw TestSetupError("notify: cannot bind \(path)") }
        let thread = Thread { [self] in receive() }
        thread.start()
    }

    var lines: [(at: Date, line: String)] { lock.withLock { received } }

    func stop() {
        lock.withLock { stopped = true }
    }

    private func receive() {
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !lock.withLock({ stopped }) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 50) > 0 else { continue }
            let n = recv(fd, &buffer, buffer.count, 0)
            if n <= 0 { continue }
            let now = Date()
            let text = String(decoding: buffer[0..<n], as: UTF8.self)
            lock.withLock { for line in text.split(separator: "\n") { received.append((now, String(line))) } }
        }
        close(fd)
    }
}

final class PartitionTests: DatabaseTestCase {
    static let classes = ["red ball", "green leaf", "blue sky"]

    /// The partition starts while the job's thread writes discovery progress (every 0.3 s) and the main
    /// loop renews the lease (every 0.5 s), and lasts 8 s: longer than both bounds (2T = 0.8 s for the
    /// main loop, 13T = 5.2 s for the job's connection, T = database_timeout = 0.4 s), shorter than the lease.
    func testSilentPartitionMidJob_mainLoopKeepsTurning_daemonReconnects_everyLabelWrittenOnce() throws {
        let t = 0.4
        let watchdogSec = 4.0
        let proxy = try PartitionProxy(upstreamSocket: cluster.socketDir + "/.s.PGSQL.\(cluster.port)")
        defer { proxy.stop() }
        let notify = try NotifyListener(path: root + "/notify.sock")
        defer { notify.stop() }

        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        let imageFiles = try FileManager.default.subpathsOfDirectory(atPath: collection)
            .filter { $0.hasSuffix(".jpg") || $0.hasSuffix(".png") }.sorted()
        let id = Int64(try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, max_attempts) VALUES ($1, $2, $3::jsonb, 3) RETURNING id
            """, [collection, Self.classes, #"{"prompt_epochs": 1, "prompt_batch_size": 8, "alignment_epochs": 2, "min_k": 2, "seed": 3}"#])[0].int("id"))

        let viaProxy = "host=127.0.0.1 port=\(proxy.port) user=\(Self.workerRole) dbname=\(dbname) application_name=nolad"
        let d = try startDaemon("cut", settings: [
            "pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
            "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2", "checkpoint_seconds": "0.5",
            "database_timeout": String(t), "lease_seconds": "20", "heartbeat_seconds": "0.5", "image_delay_seconds": "0.3",
        ], environment: ["NOLAD_DATABASE": viaProxy, "NOTIFY_SOCKET": notify.path,
                         "WATCHDOG_USEC": String(Int(watchdogSec * 1_000_000))])
        XCTAssertGreaterThan(proxy.accepted, 0, "the daemon connects through the proxy")
        try waitUntil("discovery is under way", timeout: 60) {
            let row = try db.query("SELECT stage, stage_done FROM nola.jobs WHERE id = $1", [id])[0]
            return try row.optionalString("stage") == "discover" && (try row.optionalInt("stage_done") ?? 0) >= 3
        }
        let acceptedBefore = proxy.accepted
        proxy.pause()
        let cut = Date()

        // The main loop notices within heartbeat_seconds + 2T (slack for a loaded machine), by itself.
        try waitUntil("the main loop notices the dead connection", timeout: 0.5 + 2 * t + 4) {
            d.log.contains("database unavailable; retrying with backoff")
        }
        let mainLoopNoticed = Date().timeIntervalSince(cut)
        // The job's connection gives up after 13T without a reply and retries (0.3 s + 13T, plus slack).
        try waitUntil("the job's connection notices", timeout: 0.3 + 13 * t + 4) {
            d.log.split(separator: "\n").contains { $0.contains("database unavailable, retrying") && $0.contains("job=\(id)") }
        }
        let jobNoticed = Date().timeIntervalSince(cut)
        print("silent partition: noticed after \(String(format: "%.2f", mainLoopNoticed)) s by the main loop (bound \(0.5 + 2 * t) s), \(String(format: "%.2f", jobNoticed)) s by the job's connection (bound \(0.3 + 13 * t) s)")
        let log = d.log
        XCTAssertTrue(log.contains("no reply from the server for 0.8 s"), log)
        XCTAssertTrue(log.contains("no reply from the server for 5.2 s"), log)
        let partitionSeconds = 8.0
        Thread.sleep(forTimeInterval: max(0, partitionSeconds - Date().timeIntervalSince(cut)))

        // All along, the main loop kept sending WATCHDOG=1 often enough for systemd's WatchdogSec.
        let healed = Date()
        let pings = [cut] + notify.lines.filter { $0.line == "WATCHDOG=1" && $0.at > cut }.map(\.at) + [healed]
        let gaps = zip(pings.dropFirst(), pings).map { $0.timeIntervalSince($1) }
        print("WATCHDOG=1 during the partition: \(pings.count - 2), longest gap \(String(format: "%.2f", gaps.max() ?? 0)) s (WatchdogSec \(watchdogSec) s)")
        XCTAssertGreaterThanOrEqual(pings.count - 2, 3, "the main loop kept pinging the watchdog")
        XCTAssertLessThan(gaps.max() ?? .infinity, watchdogSec, "systemd would have killed the daemon")
        XCTAssertEqual(try job(id).string("state"), "running", "the lease (20 s) outlives the partition")

        proxy.resume()
        let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 240)
        XCTAssertEqual(try row.string("state"), "succeeded", d.log)
        XCTAssertEqual(try row.int("attempt"), 1, "the partition cost no attempt")
        let attempts = try db.query("SELECT outcome FROM nola.attempts WHERE job_id = $1", [id])
        XCTAssertEqual(attempts.count, 1)
        XCTAssertEqual(try attempts[0].string("outcome"), "succeeded")
        XCTAssertGreaterThan(proxy.accepted, acceptedBefore, "the daemon reconnected through the proxy")
        let after = d.log
        XCTAssertTrue(after.contains("database available again"), after)
        XCTAssertGreaterThanOrEqual(after.components(separatedBy: "reconnected to the database").count - 1, 2,
                                    "both the control and the job's connection reconnected: \(after)")

        // Nothing lost, nothing doubled: one image row and one label row per file, for this job only.
        let images = try Results.images(db, jobID: id).map(\.path)
        XCTAssertEqual(images, imageFiles)
        let labels = try db.query("SELECT path, count(*) AS n FROM nola.labels WHERE job_id = $1 GROUP BY path ORDER BY path", [id])
        XCTAssertEqual(try labels.rows.map { try $0.string("path") }, imageFiles)
        XCTAssertTrue(try labels.rows.allSatisfy { try $0.int("n") == 1 })
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1", [id])[0].int("n"), imageFiles.count)
        XCTAssertEqual(try db.query("SELECT count(*) AS n FROM nola.events WHERE job_id = $1 AND kind = 'claimed'", [id])[0].int("n"), 1)

        // And it still serves SIGTERM promptly.
        d.signal(SIGTERM)
        XCTAssertEqual(d.waitExit(timeout: 10), 0, d.log)
    }

    /// A session that holds the job's row lock for 1.5 s (as a partitioned daemon's abandoned transaction
    /// would until the server ends it) makes the job's progress write and the lease renewal run into
    /// lock_timeout (T = 0.4 s) several times. Those are retried, not taken for a bad job.
    func testRowLockedPastLockTimeout_writesAreRetried_jobSucceedsAsTheSameAttempt() throws {
        let id = try submit(try makeCollection("locked", images: 30))
        let d = try startDaemon("waits", settings: ["database_timeout": "0.4", "lease_seconds": "10", "image_delay_seconds": "0.1"])
        try waitUntil("the job runs", timeout: 15) { (try job(id).optionalInt("stage_done") ?? 0) >= 3 }
        let other = try PostgresConnection(conninfo: conninfo)
        defer { other.close() }
        try other.query("BEGIN")
        try other.query("SELECT 1 FROM nola.jobs WHERE id = $1 FOR UPDATE", [id])
        Thread.sleep(forTimeInterval: 1.5)
        try other.query("COMMIT")
        let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 30)
        let error = try row.optionalString("error") ?? ""
        XCTAssertEqual(try row.string("state"), "succeeded", "\(error)\n\(d.log)")
        XCTAssertEqual(try row.int("attempt"), 1)
        XCTAssertEqual(try Results.images(db, jobID: id).count, 30)
        XCTAssertTrue(d.log.contains("database statement timed out, retrying"), d.log)
        XCTAssertTrue(d.log.contains("55P03"), d.log)
    }
}
