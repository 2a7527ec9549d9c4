import FlyingFox
import FlyingSocks
import Foundation
import Logging
import Queue

/// Reads the queue's shape from PostgreSQL for a scrape, on its own connection and its own serial
/// queue: a scrape never touches the main loop's connection or waits for it. The connection is kept
/// between scrapes and opened again after a failure. Connect, statement and TCP timeouts bound a read
/// while the database is unreachable, and a scrape waits for a read at most `timeoutSeconds` + 1 s:
/// past that it is answered without the queue, and no second read starts while one still hangs.
public final class QueueSampler: @unchecked Sendable {
    public static let timeoutSeconds = 5
    private let conninfo: String
    private let queue = DispatchQueue(label: "nolad.metrics.queue-sampler")
    private var connection: PostgresConnection?
    private let lock = NSLock()
    private var inFlight = false

    public init(conninfo: String) {
        self.conninfo = Self.withTimeouts(conninfo, seconds: Self.timeoutSeconds)
    }

    /// `conninfo` with libpq's connect_timeout, TCP keepalives and tcp_user_timeout added (the last two
    /// apply to TCP connections only), in the form it is written in (URI or key=value). Keys the
    /// operator wrote stay as written.
    public static func withTimeouts(_ conninfo: String, seconds: Int) -> String {
        let settings = [("connect_timeout", "\(seconds)"), ("keepalives", "1"), ("keepalives_idle", "\(seconds)"),
                        ("keepalives_interval", "1"), ("keepalives_count", "\(seconds)"), ("tcp_user_timeout", "\(seconds * 1000)")]
            .filter { !conninfo.contains($0.0) }
        let uri = conninfo.hasPrefix("postgresql://") || conninfo.hasPrefix("postgres://")
        var result = conninfo
        for (key, value) in settings {
            if uri {
                result += (result.contains("?") ? "&" : "?") + "\(key)=\(value)"
            } else {
                result += (result.isEmpty ? "" : " ") + "\(key)=\(value)"
            }
        }
        return result
    }

    struct Busy: Error, CustomStringConvertible {
        let description = "a previous read of the queue has not finished"
    }

    public func sample() async -> Result<DaemonMetrics.QueueSample, Error> {
        let start: Bool = lock.withLock {
            if inFlight { return false }
            inFlight = true
            return true
        }
        guard start else { return .failure(Busy()) }
        return await withCheckedContinuation { continuation in
            let once = Once(continuation)
            queue.async {
                let result = Result { try self.sampleNow() }
                self.lock.withLock { self.inFlight = false }
                once.resume(result)
            }
            DispatchQueue.global().asyncAfter(deadline: .now() + .seconds(Self.timeoutSeconds + 1)) {
                once.resume(.failure(Busy()))
            }
        }
    }

    private final class Once: @unchecked Sendable {
        private let lock = NSLock()
        private var continuation: CheckedContinuation<Result<DaemonMetrics.QueueSample, Error>, Never>?
        init(_ c: CheckedContinuation<Result<DaemonMetrics.QueueSample, Error>, Never>) { continuation = c }
        func resume(_ r: Result<DaemonMetrics.QueueSample, Error>) {
            let c: CheckedContinuation<Result<DaemonMetrics.QueueSample, Error>, Never>? = lock.withLock {
                defer { continuation = nil }
                return continuation
            }
            c?.resume(returning: r)
        }
    }

    private func sampleNow() throws -> DaemonMetrics.QueueSample {
        do {
            let c: PostgresConnection
            if let open = connection, open.isOpen {
                c = open
            } else {
                connection?.close()
                c = try PostgresConnection(conninfo: conninfo)
                try c.query("SET statement_timeout = '\(Self.timeoutSeconds)s'")
                connection = c
            }
            // One statement, so one snapshot: the counts by state and the due figures agree even while a
            // daemon claims a job between them.
            let rows = try c.query("""
                WITH due AS (
                    SELECT count(*) FILTER (WHERE run_after > now()) AS not_due,
                           COALESCE(EXTRACT(EPOCH FROM now() - min(run_after) FILTER (WHERE run_after <= now())), 0)::float8 AS oldest
                    FROM nola.jobs WHERE state = 'queued')
                SELECT s.state::text AS state, count(j.id) AS n, (SELECT not_due FROM due) AS not_due, (SELECT oldest FROM due) AS oldest
                FROM unnest(enum_range(NULL::nola.job_state)) AS s(state)
                LEFT JOIN nola.jobs j ON j.state = s.state
                GROUP BY s.state
                """)
            var byState: [String: Int] = [:]
            for row in rows.rows { byState[try row.string("state")] = try row.int("n") }
            return DaemonMetrics.QueueSample(jobsByState: byState, notYetDue: try rows[0].int("not_due"),
                                             oldestDueSeconds: try rows[0].double("oldest"))
        } catch {
            connection?.close()
            connection = nil
            throw error
        }
    }
}

/// The optional HTTP listener of `nolad serve` (configuration `metrics_listen`): `/metrics` in the
/// Prometheus text format, `/healthz` and `/readyz`. It runs FlyingFox's server on Swift concurrency's
/// threads, apart from the worker's main loop, which it only reads through `DaemonMetrics`.
public final class MetricsListener: @unchecked Sendable {
    private let server: HTTPServer
    private var task: Task<Void, Error>?
    public let address: ListenAddress

    private init(server: HTTPServer, address: ListenAddress) {
        self.server = server
        self.address = address
    }

    /// Binds `address` and serves until `stop()`; throws a sentence when the address cannot be bound.
    public static func start(address: ListenAddress, metrics: DaemonMetrics, sampler: QueueSampler, logger: Logger) throws -> MetricsListener {
        let log = FlyingFoxLogger(logger: logger)
        let server: HTTPServer
        switch address.family {
        case .ipv4: server = HTTPServer(address: try .inet(ip4: address.host, port: address.port), timeout: 15, logger: log)
        case .ipv6: server = HTTPServer(address: try .inet6(ip6: address.host, port: address.port), timeout: 15, logger: log)
        }
        let listener = MetricsListener(server: server, address: address)

        let outcome = Outcome()
        let done = DispatchSemaphore(value: 0)
        Task {
            await server.appendRoute("GET /metrics") { _ in
                let sample = await sampler.sample()
                let body = metrics.exposition(queue: try? sample.get(), queueFailed: (try? sample.get()) == nil)
                return HTTPResponse(statusCode: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                                    body: Data(body))
            }
            await server.appendRoute("GET /healthz") { _ in
                let (ok, text) = metrics.liveness()
                return HTTPResponse(statusCode: ok ? .ok : .serviceUnavailable, headers: [.contentType: "text/plain; charset=utf-8"],
                                    body: Data((text + "\n").utf8))
            }
            await server.appendRoute("GET /readyz") { _ in
                let (ok, text) = metrics.readiness()
                return HTTPResponse(statusCode: ok ? .ok : .serviceUnavailable, headers: [.contentType: "text/plain; charset=utf-8"],
                                    body: Data((text + "\n").utf8))
            }
            listener.task = Task {
                do {
                    try await server.run()
                } catch {
                    outcome.set(error)
                    done.signal()
                    throw error
                }
            }
            do {
                try await server.waitUntilListening(timeout: 10)
            } catch {
                outcome.set(error)
            }
            done.signal()
        }
        done.wait()
        if let error = outcome.error {
            listener.stop()
            throw NoladError(.config, "cannot listen on \(address) (metrics_listen): \(describe(error))")
        }
        logger.info("metrics listener ready", metadata: ["address": "\(address)", "paths": "/metrics /healthz /readyz"])
        return listener
    }

    public func stop() {
        let server = self.server
        let stopped = DispatchSemaphore(value: 0)
        Task {
            await server.stop(timeout: 1)
            stopped.signal()
        }
        _ = stopped.wait(timeout: .now() + 3)
        task?.cancel()
    }

    private static func describe(_ error: Error) -> String {
        if let socket = error as? SocketError, case .failed(_, let errno, let message) = socket {
            return errno == EADDRINUSE ? "the address is already in use" : message
        }
        return "\(error)"
    }

    private final class Outcome: @unchecked Sendable {
        private let lock = NSLock()
        private var first: Error?
        func set(_ e: Error) { lock.withLock { if first == nil { first = e } } }
        var error: Error? { lock.withLock { first } }
    }
}

/// FlyingFox's log lines go to the daemon's logger, at debug level except its errors.
struct FlyingFoxLogger: FlyingSocks.Logging {
    let logger: Logger
    func logDebug(_ debug: @autoclosure () -> String) { logger.trace("http: \(debug())") }
    func logInfo(_ info: @autoclosure () -> String) { logger.debug("http: \(info())") }
    func logWarning(_ warning: @autoclosure () -> String) { logger.debug("http: \(warning())") }
    func logError(_ error: @autoclosure () -> String) { logger.warning("http: \(error())") }
    func logCritical(_ critical: @autoclosure () -> String) { logger.error("http: \(critical())") }
}
