import Foundation

/// One claim of one shard: every write for it is guarded by all of these
/// (`state = 'running' AND worker = $worker AND claims = $claim`), as a job's writes are by `JobRef`.
public struct ShardRef: Sendable, Equatable, Hashable, CustomStringConvertible {
    public let jobID: Int64
    public let stage: String
    public let index: Int
    public let worker: String
    /// The shard's claim number (`nola.shards.claims` after this claim).
    public let claim: Int

    public init(jobID: Int64, stage: String, index: Int, worker: String, claim: Int) {
        self.jobID = jobID
        self.stage = stage
        self.index = index
        self.worker = worker
        self.claim = claim
    }

    public var description: String { "\(stage) shard \(index) of job \(jobID)" }
}

/// A shard as claimed: its images and what the stage's shards depend on.
public struct ClaimedShard: Sendable {
    public let ref: ShardRef
    /// The shard's images, in the job's order (paths of nola.images).
    public let paths: [String]
    public let inputs: ShardInputs
    /// The job's collection folder and parameters (the helper resolves the folder under its own roots).
    public let collection: String
    public let parametersJSON: String
}

/// What every shard of one (job, stage) depends on, written by the job's owner when the stage starts.
public struct ShardInputs: Sendable, Equatable {
    /// SHA-256 over everything here and the shards' image lists: shards made for another key are made again.
    public let key: String
    public let clipModel: String
    public let dinoModel: String?
    /// The identities of the models (folder name @ weights hash) the owner computes with: a helper whose
    /// folders hold other weights must not help.
    public let modelKeys: [String]
    /// Label stage: the tuned prompts (safetensors).
    public let blob: [UInt8]?

    public init(key: String, clipModel: String, dinoModel: String?, modelKeys: [String], blob: [UInt8]?) {
        self.key = key
        self.clipModel = clipModel
        self.dinoModel = dinoModel
        self.modelKeys = modelKeys
        self.blob = blob
    }
}

/// A shard's progress as its owner sees it.
public struct ShardProgress: Sendable, Equatable {
    public let total: Int
    public let done: Int
    /// Images of the done shards.
    public let imagesDone: Int

    public init(total: Int, done: Int, imagesDone: Int) {
        self.total = total
        self.done = done
        self.imagesDone = imagesDone
    }
}

/// A done shard's result, read back by the owner in shard order.
public struct ShardResult: Sendable {
    public let index: Int
    public let paths: [String]
    public let result: [UInt8]?
    public let unreadable: [String: String]
}

/// The SQL of shards (migration 0010): the owner makes a stage's shards, any worker claims one with
/// `FOR UPDATE SKIP LOCKED` under a lease (an expired lease makes the shard claimable again, so claiming
/// is also the rescue), renews it while working, and completes it with a guarded write. Bind parameters only.
public enum ShardStore {
    static let guardClause = "job_id = $1 AND stage = $2 AND index = $3 AND state = 'running' AND worker = $4 AND claims = $5"
    static func guardParameters(_ s: ShardRef) -> [PostgresBindable?] { [s.jobID, s.stage, s.index, s.worker, s.claim] }

    /// The key of a stage's shards: SHA-256 over the inputs and every shard's image list.
    public static func key(stage: String, clipModel: String, dinoModel: String?, modelKeys: [String], blob: [UInt8]?, shards: [[String]]) -> String {
        var text = "stage \(stage)\nclip \(clipModel)\ndino \(dinoModel ?? "-")\n"
        for k in modelKeys { text += "model \(k)\n" }
        if let blob { text += "blob \(SHA256.hex(SHA256.hash(blob)))\n" }
        for (i, s) in shards.enumerated() { text += "shard \(i) \(s.count)\n" + s.joined(separator: "\n") + "\n" }
        return SHA256.hex(SHA256.hash(Array(text.utf8)))
    }

    /// Cuts `paths` into shards of `size` images (the last may be shorter).
    public static func cut(_ paths: [String], size: Int) -> [[String]] {
        precondition(size >= 1)
        return stride(from: 0, to: paths.count, by: size).map { Array(paths[$0..<min(paths.count, $0 + size)]) }
    }

    /// The owner makes the stage's shards, guarded by the job's ownership. Idempotent: when shards with the
    /// same key exist (a resumed attempt), they are kept with what is done; otherwise earlier ones are
    /// replaced. Returns nil when the job is no longer ours, else whether existing shards were kept.
    public static func prepare(_ c: PostgresConnection, _ job: JobRef, stage: String, inputs: ShardInputs, shards: [[String]]) throws -> Bool? {
        try c.transaction {
            guard !(try c.query("SELECT 1 FROM nola.jobs WHERE \(JobStore.guardClause) FOR UPDATE", [job.id, job.worker, job.attempt])).isEmpty else {
                return nil
            }
            let existing = try c.query("SELECT key, blob IS NULL AS cleared FROM nola.shard_inputs WHERE job_id = $1 AND stage = $2",
                                       [job.id, stage])
            // Kept unless made for other inputs, or their results were already cleared (`clearResults`).
            if let row = existing.rows.first, try row.string("key") == inputs.key {
                let cleared = try row.bool("cleared")
                if !(inputs.blob != nil && cleared) { return true }
            }
            try c.query("DELETE FROM nola.shard_inputs WHERE job_id = $1 AND stage = $2", [job.id, stage])
            try c.query("""
                INSERT INTO nola.shard_inputs (job_id, stage, key, clip_model, dino_model, model_keys, blob)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                """, [job.id, stage, inputs.key, inputs.clipModel, inputs.dinoModel, inputs.modelKeys,
                      inputs.blob.map { PostgresValue.bytes($0) }])
            for (i, paths) in shards.enumerated() {
                try c.query("INSERT INTO nola.shards (job_id, stage, index, paths) VALUES ($1, $2, $3, $4)", [job.id, stage, i, paths])
            }
            // Idle workers look for units (the payload is never read).
            try c.query("SELECT pg_notify('nola_work', '')")
            return false
        }
    }

    /// Drops what only the owner needed while the stage ran (the shards' results and the stored blob) once the
    /// stage's output is written, guarded; the rows stay for nola.job_status. A later `prepare` makes such
    /// shards again rather than keep them.
    @discardableResult
    public static func clearResults(_ c: PostgresConnection, _ job: JobRef, stage: String) throws -> Bool {
        try c.transaction {
            guard !(try c.query("SELECT 1 FROM nola.jobs WHERE \(JobStore.guardClause) FOR UPDATE", [job.id, job.worker, job.attempt])).isEmpty else {
                return false
            }
            try c.query("UPDATE nola.shards SET result = NULL WHERE job_id = $1 AND stage = $2 AND result IS NOT NULL", [job.id, stage])
            try c.query("UPDATE nola.shard_inputs SET blob = NULL WHERE job_id = $1 AND stage = $2 AND blob IS NOT NULL", [job.id, stage])
            return true
        }
    }

    /// Claims one shard that is queued or whose lease expired, of a running job not being cancelled.
    /// `job`: only that job's (the owner working on its own stage); nil: any job's, most urgent first.
    /// `stages`: the stages this worker can serve; `skipJobs`: jobs it gave up helping.
    public static func claim(_ c: PostgresConnection, worker: String, leaseSeconds: Double, job: Int64? = nil,
                             stages: [String] = ["encode", "label"], skipJobs: [Int64] = []) throws -> ClaimedShard? {
        try c.transaction {
            let rows = try c.query("""
                WITH next AS (
                    SELECT s.job_id, s.stage, s.index
                    FROM nola.shards s
                    JOIN nola.jobs j ON j.id = s.job_id
                    WHERE j.state = 'running' AND NOT j.cancel_requested AND j.stage = s.stage
                      AND (s.state = 'queued' OR (s.state = 'running' AND s.lease_expires_at < now()))
                      AND s.stage = ANY ($3::text[])
                      AND ($4::bigint IS NULL OR s.job_id = $4)
                      AND NOT s.job_id = ANY ($5::bigint[])
                    ORDER BY j.priority DESC, s.job_id, s.index
                    LIMIT 1
                    FOR UPDATE OF s SKIP LOCKED
                )
                UPDATE nola.shards s
                SET state = 'running', worker = $1, claims = s.claims + 1, started_at = now(), finished_at = NULL,
                    lease_expires_at = now() + make_interval(secs => $2::double precision)
                FROM next WHERE s.job_id = next.job_id AND s.stage = next.stage AND s.index = next.index
                RETURNING s.job_id, s.stage, s.index, s.claims, s.paths
                """, [worker, leaseSeconds, ["encode", "label"].filter(stages.contains), job, skipJobs.map(String.init)])
            guard let r = rows.rows.first else { return nil }
            let ref = ShardRef(jobID: Int64(try r.int("job_id")), stage: try r.string("stage"), index: try r.int("index"),
                               worker: worker, claim: try r.int("claims"))
            let more = try c.query("""
                SELECT i.key, i.clip_model, i.dino_model, i.model_keys, i.blob, j.collection, j.parameters::text AS parameters
                FROM nola.shard_inputs i JOIN nola.jobs j ON j.id = i.job_id
                WHERE i.job_id = $1 AND i.stage = $2
                """, [ref.jobID, ref.stage])
            let m = more[0]
            let inputs = ShardInputs(key: try m.string("key"), clipModel: try m.string("clip_model"),
                                     dinoModel: try m.optionalString("dino_model"), modelKeys: try m.stringArray("model_keys"),
                                     blob: try m.optionalBytes("blob"))
            return ClaimedShard(ref: ref, paths: try r.stringArray("paths"), inputs: inputs,
                                collection: try m.string("collection"), parametersJSON: try m.string("parameters"))
        }
    }

    /// Extends the lease of a shard this worker holds. `.lost` when it is no longer ours (its lease expired and
    /// another worker claimed it); `cancelRequested` is true when its job is being cancelled or no longer
    /// running (the shard's work is not wanted any more).
    public static func renew(_ c: PostgresConnection, _ s: ShardRef, leaseSeconds: Double) throws -> LeaseRenewal {
        let rows = try c.query("""
            UPDATE nola.shards SET lease_expires_at = now() + make_interval(secs => $6::double precision)
            WHERE \(guardClause)
            RETURNING (SELECT j.state <> 'running' OR j.cancel_requested OR j.stage IS DISTINCT FROM $2
                       FROM nola.jobs j WHERE j.id = $1) AS unwanted
            """, guardParameters(s) + [leaseSeconds])
        guard let row = rows.rows.first else { return .lost }
        return .renewed(cancelRequested: (try? row.bool("unwanted")) ?? true)
    }

    /// Runs `body` in a transaction that holds the shard's row locked, only if the shard is still ours
    /// (so a rescuer's claim waits until the write is done, and nothing is written once it is not ours).
    /// Returns false (nothing written) when it is no longer ours.
    public static func guardedWrite(_ c: PostgresConnection, _ s: ShardRef, _ body: (PostgresConnection) throws -> Void) throws -> Bool {
        try c.transaction {
            guard !(try c.query("SELECT 1 FROM nola.shards WHERE \(guardClause) FOR UPDATE", guardParameters(s))).isEmpty else {
                return false
            }
            try body(c)
            return true
        }
    }

    /// Marks the shard done with its result, guarded: false when it was no longer ours (nothing written),
    /// so a shard redone after a lost lease is completed exactly once.
    public static func complete(_ c: PostgresConnection, _ s: ShardRef, result: [UInt8]?, unreadable: [String: String]) throws -> Bool {
        let json = JSONValue.object(unreadable.mapValues { .string($0) }).jsonText
        let rows = try c.query("""
            UPDATE nola.shards SET state = 'done', finished_at = now(), lease_expires_at = NULL, error = NULL,
                seconds = extract(epoch FROM now() - started_at), result = $6, unreadable = $7::jsonb
            WHERE \(guardClause)
            """, guardParameters(s) + [result.map { PostgresValue.bytes($0) }, json])
        return rows.affected == 1
    }

    /// Gives the shard back unfinished (shutdown, cancel, a helper that cannot do it), guarded; `error` is
    /// why, kept on the row. Returns false when it was no longer ours.
    @discardableResult
    public static func release(_ c: PostgresConnection, _ s: ShardRef, error: String? = nil) throws -> Bool {
        let rows = try c.query("""
            UPDATE nola.shards SET state = 'queued', worker = NULL, lease_expires_at = NULL, started_at = NULL,
                error = coalesce($6, error)
            WHERE \(guardClause)
            """, guardParameters(s) + [error])
        return rows.affected == 1
    }

    /// The shard's images (sha256 and exact name bytes from nola.images), in the order of `paths`.
    public static func images(_ c: PostgresConnection, jobID: Int64, paths: [String]) throws -> [ImageRecord] {
        let rows = try c.query("""
            SELECT i.path, i.size_bytes, i.sha256, i.format, encode(i.path_bytes, 'hex') AS raw
            FROM unnest($2::text[]) WITH ORDINALITY AS p (path, n)
            JOIN nola.images i ON i.job_id = $1 AND i.path = p.path
            ORDER BY p.n
            """, [jobID, paths])
        return try rows.rows.map {
            ImageRecord(path: try $0.string("path"), sizeBytes: try $0.int("size_bytes"),
                        sha256: try $0.string("sha256"), format: try $0.string("format"),
                        pathBytes: try $0.optionalString("raw").map(FloatBytes.unhex))
        }
    }

    /// The stage's shards: how many, how many done and their images.
    public static func progress(_ c: PostgresConnection, jobID: Int64, stage: String) throws -> ShardProgress {
        let rows = try c.query("""
            SELECT count(*)::int AS total, (count(*) FILTER (WHERE state = 'done'))::int AS done,
                   coalesce(sum(cardinality(paths)) FILTER (WHERE state = 'done'), 0)::int AS images
            FROM nola.shards WHERE job_id = $1 AND stage = $2
            """, [jobID, stage])
        return ShardProgress(total: try rows[0].int("total"), done: try rows[0].int("done"), imagesDone: try rows[0].int("images"))
    }

    /// The done shards' results in shard order (the owner reads them once all are done).
    public static func results(_ c: PostgresConnection, jobID: Int64, stage: String) throws -> [ShardResult] {
        let rows = try c.query("""
            SELECT index, paths, result, coalesce(unreadable, '{}')::text AS unreadable
            FROM nola.shards WHERE job_id = $1 AND stage = $2 AND state = 'done' ORDER BY index
            """, [jobID, stage])
        return try rows.rows.map { r in
            let unreadable = (try? JSONDecoder().decode([String: String].self, from: Data(try r.string("unreadable").utf8))) ?? [:]
            return ShardResult(index: try r.int("index"), paths: try r.stringArray("paths"),
                               result: try r.optionalBytes("result"), unreadable: unreadable)
        }
    }

    /// Which workers did the done shards of a stage (shard index → worker), for the stage's metrics.
    public static func doneBy(_ c: PostgresConnection, jobID: Int64, stage: String) throws -> [String: Int] {
        let rows = try c.query("""
            SELECT worker, count(*)::int AS n FROM nola.shards WHERE job_id = $1 AND stage = $2 AND state = 'done' GROUP BY worker
            """, [jobID, stage])
        var out: [String: Int] = [:]
        for r in rows.rows { out[try r.string("worker")] = try r.int("n") }
        return out
    }
}

/// Float32 arrays as little-endian bytes (shard results) and back.
public enum FloatBytes {
    static func unhex(_ text: String) -> [UInt8] {
        func value(_ d: UInt8) -> UInt8 { d <= 0x39 ? d - 0x30 : (d | 0x20) - 0x61 + 10 }
        let digits = Array(text.utf8)
        return stride(from: 0, to: digits.count - 1, by: 2).map { value(digits[$0]) << 4 | value(digits[$0 + 1]) }
    }

    public static func encode(_ values: [Float]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 4 * values.count)
        bytes.withUnsafeMutableBytes { raw in
            for (i, v) in values.enumerated() { raw.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
        }
        return bytes
    }

    public static func decode(_ bytes: [UInt8]) -> [Float] {
        bytes.withUnsafeBytes { raw in
            (0..<(bytes.count / 4)).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) }
        }
    }
}

extension PostgresRow {
    /// A bytea column that may be NULL.
    public func optionalBytes(_ column: String) throws -> [UInt8]? {
        try optionalString(column) == nil ? nil : try bytes(column)
    }
}
