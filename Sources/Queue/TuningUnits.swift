import Foundation

/// Data-parallel prompt tuning through PostgreSQL (migrations 0011, 0012): the owner of a job publishes the
/// parameters of optimizer step t and the step's units; any worker with the job's CLIP claims a unit
/// (`FOR UPDATE SKIP LOCKED`, under a lease), computes its gradient and writes it once while its lease
/// holds; the owner reads the results back in unit order.
public enum TuningUnits {
    /// One unit as the owner creates it.
    public struct NewUnit: Sendable, Equatable {
        public var unit: Int
        public var images: [Int]
        public var targets: [Int]
        public var files: [[UInt8]]
        public init(unit: Int, images: [Int], targets: [Int], files: [[UInt8]]) {
            self.unit = unit
            self.images = images
            self.targets = targets
            self.files = files
        }
    }

    /// A unit claimed by a worker: what it needs to compute it.
    public struct Claim: Sendable, Equatable {
        public var jobID: Int64
        public var attempt: Int
        public var step: Int
        public var unit: Int
        public var epoch: Int
        public var logicalBatch: Int
        public var images: [Int]
        public var targets: [Int]
        public var files: [[UInt8]]
        /// How many times the unit has been claimed (1 = first; more = given back or rescued before).
        public var claims: Int
        /// Taken over from a worker whose lease had expired (not given back).
        public var rescued: Bool
    }

    /// A finished unit's result bytes (`PromptUnitResult.bytes`).
    public struct Done: Sendable, Equatable {
        public var unit: Int
        public var result: [UInt8]
        public var worker: String
    }

    /// A new attempt's start: the rows of every other attempt of the job are removed (their parameter
    /// versions may not be this attempt's). False when the job is no longer ours.
    @discardableResult
    public static func begin(_ c: PostgresConnection, _ job: JobRef) throws -> Bool {
        try c.transaction {
            guard try JobStore.isOwned(c, job) else { return false }
            try c.query("DELETE FROM nola.tuning_units WHERE job_id = $1", [job.id])
            try c.query("DELETE FROM nola.tuning_parameters WHERE job_id = $1", [job.id])
            try c.query("DELETE FROM nola.tuning_workers WHERE job_id = $1", [job.id])
            return true
        }
    }

    /// Publishes the parameters of `step` and creates its units (pending), and removes the rows of
    /// earlier steps, in one transaction guarded by the job's ownership. Idempotent: units that exist
    /// are kept (a done unit keeps its result). False when the job is no longer ours.
    @discardableResult
    public static func publish(_ c: PostgresConnection, _ job: JobRef, step: Int, epoch: Int, logicalBatch: Int,
                               parameters blob: [UInt8], units: [NewUnit]) throws -> Bool {
        try c.transaction {
            // Locks the job row: a concurrent release or rescue waits for this transaction, and this one
            // sees whether it still owns the job.
            let owned = try c.query("""
                SELECT 1 FROM nola.jobs WHERE id = $1 AND state = 'running' AND worker = $2 AND attempt = $3 FOR UPDATE
                """, [job.id, job.worker, job.attempt])
            guard !owned.isEmpty else { return false }
            try c.query("""
                INSERT INTO nola.tuning_parameters (job_id, attempt, step, blob) VALUES ($1, $2, $3, $4)
                ON CONFLICT (job_id) DO UPDATE SET attempt = EXCLUDED.attempt, step = EXCLUDED.step, blob = EXCLUDED.blob,
                    updated_at = now()
                """, [job.id, job.attempt, step, PostgresValue.bytes(blob)])
            try c.query("DELETE FROM nola.tuning_units WHERE job_id = $1 AND (step <> $2 OR attempt <> $3)", [job.id, step, job.attempt])
            // One statement for all the step's units (a round trip each would cost more than the rest
            // of the coordination), in chunks that stay far below the protocol's parameter limit.
            for chunk in stride(from: 0, to: units.count, by: 1000).map({ units[$0..<min(units.count, $0 + 1000)] }) {
                var values: [String] = []
                var parameters: [PostgresBindable?] = [job.id, job.attempt, step, epoch, logicalBatch]
                for u in chunk {
                    let k = parameters.count
                    values.append("($1, $2, $3, $\(k + 1), $4, $5, $\(k + 2)::integer[], $\(k + 3)::integer[], $\(k + 4)::bytea[])")
                    parameters += [u.unit, intArray(u.images), intArray(u.targets), byteaArray(u.files)]
                }
                try c.query("""
                    INSERT INTO nola.tuning_units (job_id, attempt, step, unit, epoch, logical_batch, images, targets, files)
                    VALUES \(values.joined(separator: ", "))
                    ON CONFLICT (job_id, step, unit) DO NOTHING
                    """, parameters)
            }
            // Idle workers look for units now rather than at their next poll (sent at commit).
            try c.query("SELECT pg_notify('nola_work', '')")
            return true
        }
    }

    /// The parameters published for `step` of this attempt, or nil when the owner has moved on (or
    /// never published it).
    public static func parameters(_ c: PostgresConnection, jobID: Int64, attempt: Int, step: Int) throws -> [UInt8]? {
        let rows = try c.query("SELECT blob FROM nola.tuning_parameters WHERE job_id = $1 AND attempt = $2 AND step = $3",
                               [jobID, attempt, step])
        return rows.isEmpty ? nil : try rows[0].bytes("blob")
    }

    static let claimColumns = """
        u.job_id, u.attempt, u.step, u.unit, u.epoch, u.logical_batch, u.images::text AS images, u.targets::text AS targets, u.claims,
        (SELECT array_agg(encode(f, 'hex') ORDER BY o) FROM unnest(u.files) WITH ORDINALITY AS x (f, o))::text AS files
        """

    /// Claims one unit: pending, or running under an expired lease (its worker died or stalled), of a
    /// running job that is not being cancelled, in the attempt and step the owner published. `jobID`
    /// limits it to one job (the owner); `jobs` limits a helper to the jobs whose CLIP it can load (nil:
    /// any). Units are taken in (job, unit) order.
    public static func claim(_ c: PostgresConnection, worker: String, leaseSeconds: Double, jobID: Int64? = nil,
                             excludingJobs: [Int64] = []) throws -> Claim? {
        let rows = try c.query("""
            WITH pick AS (
                SELECT t.job_id, t.step, t.unit, t.state AS was FROM nola.tuning_units t
                JOIN nola.jobs j ON j.id = t.job_id AND j.state = 'running' AND j.attempt = t.attempt AND NOT j.cancel_requested
                JOIN nola.tuning_parameters p ON p.job_id = t.job_id AND p.attempt = t.attempt AND p.step = t.step
                WHERE (t.state = 'pending' OR (t.state = 'running' AND t.lease_expires_at < now()))
                  AND ($3::bigint IS NULL OR t.job_id = $3) AND NOT (t.job_id = ANY ($4::bigint[]))
                ORDER BY t.job_id, t.unit
                LIMIT 1
                FOR UPDATE OF t SKIP LOCKED)
            UPDATE nola.tuning_units u SET state = 'running', worker = $1,
                lease_expires_at = now() + make_interval(secs => $2), claims = u.claims + 1
            FROM pick WHERE (u.job_id, u.step, u.unit) = (pick.job_id, pick.step, pick.unit)
            RETURNING \(claimColumns), pick.was = 'running' AS rescued
            """, [worker, leaseSeconds, jobID as PostgresBindable?, "{" + excludingJobs.map(String.init).joined(separator: ",") + "}"])
        guard !rows.isEmpty else { return nil }
        let r = rows[0]
        let files = try r.stringArray("files").map { hex -> [UInt8] in
            guard let bytes = decodeHex(hex) else { throw DatabaseError(.unexpectedResult, "tuning unit file is not hex: \(hex)") }
            return bytes
        }
        return Claim(jobID: Int64(try r.int("job_id")), attempt: try r.int("attempt"), step: try r.int("step"), unit: try r.int("unit"),
                     epoch: try r.int("epoch"), logicalBatch: try r.int("logical_batch"),
                     images: try parseIntArray(try r.string("images")), targets: try parseIntArray(try r.string("targets")),
                     files: files, claims: try r.int("claims"), rescued: try r.bool("rescued"))
    }

    /// Renews the lease of a claimed unit; false when it is no longer this worker's.
    @discardableResult
    public static func renew(_ c: PostgresConnection, _ claim: Claim, worker: String, leaseSeconds: Double) throws -> Bool {
        try c.query("""
            UPDATE nola.tuning_units SET lease_expires_at = now() + make_interval(secs => $5)
            WHERE job_id = $1 AND attempt = $2 AND step = $3 AND unit = $4 AND state = 'running' AND worker = $6
            """, [claim.jobID, claim.attempt, claim.step, claim.unit, leaseSeconds, worker]).affected == 1
    }

    /// Renews the lease of a claimed unit, reading whether its job still wants it: `.renewed(cancelRequested:
    /// true)` when the job is being cancelled or no longer runs this attempt, `.lost` when the unit is no
    /// longer this worker's.
    public static func renewLease(_ c: PostgresConnection, _ claim: Claim, worker: String, leaseSeconds: Double) throws -> LeaseRenewal {
        let rows = try c.query("""
            UPDATE nola.tuning_units SET lease_expires_at = now() + make_interval(secs => $5)
            WHERE job_id = $1 AND attempt = $2 AND step = $3 AND unit = $4 AND state = 'running' AND worker = $6
            RETURNING (SELECT j.state <> 'running' OR j.cancel_requested OR j.attempt <> $2 FROM nola.jobs j WHERE j.id = $1) AS unwanted
            """, [claim.jobID, claim.attempt, claim.step, claim.unit, leaseSeconds, worker])
        guard let row = rows.rows.first else { return .lost }
        return .renewed(cancelRequested: (try? row.bool("unwanted")) ?? true)
    }

    /// The guarded write: the result lands only while this worker holds the unit's lease, and only once
    /// (a unit already done keeps its first result; the same unit gives the same bytes anyway), and the
    /// worker's tally in nola.tuning_workers (job_status) grows with it. False when nothing was written.
    @discardableResult
    public static func complete(_ c: PostgresConnection, _ claim: Claim, worker: String, result: [UInt8], seconds: Double) throws -> Bool {
        try c.transaction {
            let rows = try c.query("""
                UPDATE nola.tuning_units SET state = 'done', result = $5, seconds = $6, finished_at = now(), lease_expires_at = NULL
                WHERE job_id = $1 AND attempt = $2 AND step = $3 AND unit = $4 AND state = 'running' AND worker = $7
                  AND lease_expires_at > now()
                """, [claim.jobID, claim.attempt, claim.step, claim.unit, PostgresValue.bytes(result), seconds, worker])
            guard rows.affected == 1 else { return false }
            try c.query("""
                INSERT INTO nola.tuning_workers (job_id, attempt, worker, units, views, seconds) VALUES ($1, $2, $3, 1, $4, $5)
                ON CONFLICT (job_id, attempt, worker) DO UPDATE SET units = nola.tuning_workers.units + 1,
                    views = nola.tuning_workers.views + EXCLUDED.views, seconds = nola.tuning_workers.seconds + EXCLUDED.seconds,
                    last_at = now()
                """, [claim.jobID, claim.attempt, worker, claim.images.count, seconds])
            try c.query("SELECT pg_notify('nola_units', $1)", [String(claim.jobID)])
            return true
        }
    }

    /// Gives a claimed unit back (a stopping helper, or one that cannot do it): pending again at once, for
    /// anyone; guarded (nothing when it is no longer ours). `error` says why this worker could not do it: kept
    /// as its last reason in nola.tuning_workers, shown in job_status's worker_rates.
    public static func release(_ c: PostgresConnection, _ claim: Claim, worker: String, error: String? = nil) throws {
        try c.transaction {
            let rows = try c.query("""
                UPDATE nola.tuning_units SET state = 'pending', worker = NULL, lease_expires_at = NULL
                WHERE job_id = $1 AND attempt = $2 AND step = $3 AND unit = $4 AND state = 'running' AND worker = $5
                RETURNING 1
                """, [claim.jobID, claim.attempt, claim.step, claim.unit, worker])
            guard !rows.isEmpty, let error else { return }
            try c.query("""
                INSERT INTO nola.tuning_workers (job_id, attempt, worker, error) VALUES ($1, $2, $3, $4)
                ON CONFLICT (job_id, attempt, worker) DO UPDATE SET error = EXCLUDED.error, last_at = now()
                """, [claim.jobID, claim.attempt, worker, error])
        }
    }

    /// Gives back every unit this worker holds (shutdown).
    public static func releaseAll(_ c: PostgresConnection, worker: String) throws {
        try c.query("UPDATE nola.tuning_units SET state = 'pending', worker = NULL, lease_expires_at = NULL WHERE state = 'running' AND worker = $1",
                    [worker])
    }

    /// (units done, units in the step) of the job's current step.
    public static func progress(_ c: PostgresConnection, _ job: JobRef, step: Int) throws -> (done: Int, total: Int) {
        let rows = try c.query("""
            SELECT count(*) FILTER (WHERE state = 'done') AS done, count(*) AS total FROM nola.tuning_units
            WHERE job_id = $1 AND attempt = $2 AND step = $3
            """, [job.id, job.attempt, step])
        return (try rows[0].int("done"), try rows[0].int("total"))
    }

    /// The results of these done units of the step (others are left out), with the worker that wrote each.
    public static func results(_ c: PostgresConnection, _ job: JobRef, step: Int, units: [Int]) throws -> [Done] {
        if units.isEmpty { return [] }
        let rows = try c.query("""
            SELECT unit, result, worker FROM nola.tuning_units
            WHERE job_id = $1 AND attempt = $2 AND step = $3 AND state = 'done' AND unit = ANY ($4::integer[])
            ORDER BY unit
            """, [job.id, job.attempt, step, intArray(units)])
        return try rows.rows.map { Done(unit: try $0.int("unit"), result: try $0.bytes("result"), worker: try $0.string("worker")) }
    }

    /// The job's tuning rows once prompt tuning is over.
    public static func finish(_ c: PostgresConnection, _ job: JobRef) throws {
        try c.query("DELETE FROM nola.tuning_units WHERE job_id = $1 AND attempt = $2", [job.id, job.attempt])
        try c.query("DELETE FROM nola.tuning_parameters WHERE job_id = $1 AND attempt = $2", [job.id, job.attempt])
    }

    static func intArray(_ values: [Int]) -> String { "{" + values.map(String.init).joined(separator: ",") + "}" }

    static func byteaArray(_ values: [[UInt8]]) -> String {
        // Each element in hex form, quoted: {"\\x2f61","\\x2f62"}
        "{" + values.map { bytes in "\"\\\\x" + bytes.map { String(format: "%02x", $0) }.joined() + "\"" }.joined(separator: ",") + "}"
    }

    static func parseIntArray(_ text: String) throws -> [Int] {
        let inner = text.trimmingCharacters(in: CharacterSet(charactersIn: "{}"))
        if inner.isEmpty { return [] }
        return try inner.split(separator: ",").map {
            guard let v = Int($0) else { throw DatabaseError(.unexpectedResult, "integer array element \($0) is not a number") }
            return v
        }
    }
}
