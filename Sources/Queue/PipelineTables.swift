import Foundation

/// The pipeline's own tables (migration 0002): prompt-tuning checkpoints and the feature cache; and
/// reading an earlier job's tuned prompts. Checkpoint writes are guarded by the job's ownership.
public enum PipelineTables {
    /// Stores (or replaces) the job's prompt-tuning checkpoint; false when the job is no longer ours.
    @discardableResult
    public static func saveCheckpoint(_ c: PostgresConnection, _ job: JobRef, blob: [UInt8], epoch: Int, step: Int) throws -> Bool {
        let rows = try c.query("""
            INSERT INTO nola.checkpoints (job_id, blob, epoch, step)
            SELECT $1, $4, $5, $6 WHERE \(Results.owned)
            ON CONFLICT (job_id) DO UPDATE SET blob = EXCLUDED.blob, epoch = EXCLUDED.epoch, step = EXCLUDED.step,
                updated_at = now()
            """, [job.id, job.worker, job.attempt, PostgresValue.bytes(blob), epoch, step])
        return rows.affected == 1
    }

    /// The job's checkpoint, or nil.
    public static func checkpoint(_ c: PostgresConnection, jobID: Int64) throws -> (blob: [UInt8], epoch: Int, step: Int)? {
        let rows = try c.query("SELECT blob, epoch, step FROM nola.checkpoints WHERE job_id = $1", [jobID])
        guard !rows.isEmpty else { return nil }
        return (try rows[0].bytes("blob"), try rows[0].int("epoch"), try rows[0].int("step"))
    }

    /// Removes the job's checkpoint (once its results are written).
    @discardableResult
    public static func deleteCheckpoint(_ c: PostgresConnection, _ job: JobRef) throws -> Bool {
        guard try JobStore.isOwned(c, job) else { return false }
        try c.query("DELETE FROM nola.checkpoints WHERE job_id = $1", [job.id])
        return true
    }

    /// Cached features of these images (by SHA-256) for one model and view: sha256 → values.
    public static func cachedFeatures(_ c: PostgresConnection, model: String, view: String, sha256: [String],
                                      dimension: Int) throws -> [String: [Float]] {
        if sha256.isEmpty { return [:] }
        let rows = try c.query("""
            SELECT sha256, features FROM nola.feature_cache
            WHERE model = $1 AND view = $2 AND dimension = $3 AND sha256 = ANY ($4::text[])
            """, [model, view, dimension, sha256])
        var out: [String: [Float]] = [:]
        for row in rows.rows {
            let bytes = try row.bytes("features")
            guard bytes.count == 4 * dimension else { continue }
            out[try row.string("sha256")] = bytes.withUnsafeBytes { raw in
                (0..<dimension).map { Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) }
            }
        }
        return out
    }

    /// Adds features to the cache (one row per image; existing rows are kept).
    public static func cacheFeatures(_ c: PostgresConnection, model: String, view: String, dimension: Int,
                                     _ features: [(sha256: String, values: [Float])]) throws {
        for (sha, values) in features {
            precondition(values.count == dimension)
            var bytes = [UInt8](repeating: 0, count: 4 * dimension)
            bytes.withUnsafeMutableBytes { raw in
                for (i, v) in values.enumerated() { raw.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: 4 * i, as: UInt32.self) }
            }
            try c.query("""
                INSERT INTO nola.feature_cache (model, sha256, view, dimension, features) VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (model, sha256, view) DO NOTHING
                """, [model, sha, view, dimension, PostgresValue.bytes(bytes)])
        }
    }

    /// The tuned prompts of a finished job: the safetensors blob and its backbone identity (JSON text).
    public static func prompts(_ c: PostgresConnection, jobID: Int64) throws -> (safetensors: [UInt8], backbone: String)? {
        let rows = try c.query("SELECT safetensors, backbone::text AS backbone FROM nola.prompts WHERE job_id = $1", [jobID])
        guard !rows.isEmpty else { return nil }
        return (try rows[0].bytes("safetensors"), try rows[0].string("backbone"))
    }
}
