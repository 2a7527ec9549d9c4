import Foundation

/// One row of `nola.images`.
public struct ImageRecord: Sendable, Equatable {
    /// Relative to the job's collection folder, '/'-separated.
    public let path: String
    public let sizeBytes: Int
    /// Lowercase hex SHA-256 of the file's bytes.
    public let sha256: String
    /// "jpeg" or "png".
    public let format: String
    /// The exact bytes of the relative path when they are not valid UTF-8 (`path` is then the text form
    /// with each such byte written as `\xNN`); nil when `path` is the exact name.
    public let pathBytes: [UInt8]?

    public init(path: String, sizeBytes: Int, sha256: String, format: String, pathBytes: [UInt8]? = nil) {
        self.path = path
        self.sizeBytes = sizeBytes
        self.sha256 = sha256
        self.format = format
        self.pathBytes = pathBytes
    }
}

/// One row of `nola.labels`: a label (with the zero-shot one and the signals, docs/labels.md), an
/// abstention (no label, the reason, the same signals) or the reason the image is unreadable.
public struct LabelRecord: Sendable, Equatable {
    public let path: String
    public let label: String?
    public let confidence: Float?
    public let zeroShotLabel: String?
    public let zeroShotConfidence: Float?
    public let unreadable: String?
    /// The final model's most probable classes, best first, and their probabilities.
    public let topLabels: [String]?
    public let topProbabilities: [Float]?
    public let margin: Float?
    /// The alignment module's class; nil for inference-only jobs.
    public let teacherLabel: String?
    public let agreement: Bool?
    /// Why the image has no label (the job's abstain_* parameters).
    public let abstained: String?

    public init(path: String, label: String, confidence: Float, zeroShotLabel: String, zeroShotConfidence: Float) {
        self.init(path: path, label: label, abstained: nil, confidence: confidence, zeroShotLabel: zeroShotLabel,
                  zeroShotConfidence: zeroShotConfidence, topLabels: nil, topProbabilities: nil, margin: nil,
                  teacherLabel: nil, agreement: nil)
    }

    /// A readable image: `label` nil and `abstained` the reason when the job abstains on it.
    public init(path: String, label: String?, abstained: String?, confidence: Float, zeroShotLabel: String, zeroShotConfidence: Float,
                topLabels: [String]?, topProbabilities: [Float]?, margin: Float?, teacherLabel: String?, agreement: Bool?) {
        precondition((label == nil) != (abstained == nil), "a label or an abstention reason")
        self.path = path
        self.label = label
        self.abstained = abstained
        self.confidence = confidence
        self.zeroShotLabel = zeroShotLabel
        self.zeroShotConfidence = zeroShotConfidence
        self.unreadable = nil
        self.topLabels = topLabels
        self.topProbabilities = topProbabilities
        self.margin = margin
        self.teacherLabel = teacherLabel
        self.agreement = agreement
    }

    public init(path: String, unreadable reason: String) {
        self.path = path
        self.label = nil
        self.confidence = nil
        self.zeroShotLabel = nil
        self.zeroShotConfidence = nil
        self.unreadable = reason
        self.topLabels = nil
        self.topProbabilities = nil
        self.margin = nil
        self.teacherLabel = nil
        self.agreement = nil
        self.abstained = nil
    }
}

/// Writes and reads a job's results. Writes are guarded by the job's ownership (nothing is written
/// once another worker owns the job) and idempotent (a retried batch overwrites, never duplicates).
public enum Results {
    static let owned = "EXISTS (SELECT 1 FROM nola.jobs WHERE id = $1 AND state = 'running' AND worker = $2 AND attempt = $3)"

    /// Removes the images (and with them the labels) of earlier attempts of this job.
    @discardableResult
    public static func clearImages(_ c: PostgresConnection, _ job: JobRef) throws -> Bool {
        guard try JobStore.isOwned(c, job) else { return false }
        try c.query("DELETE FROM nola.images WHERE job_id = $1 AND \(owned)", [job.id, job.worker, job.attempt])
        return true
    }

    /// Upserts a batch of images; false when the job is no longer ours.
    @discardableResult
    public static func insertImages(_ c: PostgresConnection, _ job: JobRef, _ images: [ImageRecord]) throws -> Bool {
        if images.isEmpty { return try JobStore.isOwned(c, job) }
        let rows = try c.query("""
            INSERT INTO nola.images (job_id, path, size_bytes, sha256, format, path_bytes)
            SELECT $1, u.path, u.size, u.sha, u.format, decode(u.raw, 'hex')
            FROM unnest($4::text[], $5::bigint[], $6::text[], $7::text[], $8::text[]) AS u(path, size, sha, format, raw)
            WHERE \(owned)
            ON CONFLICT (job_id, path) DO UPDATE
                SET size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256, format = EXCLUDED.format,
                    path_bytes = EXCLUDED.path_bytes
            """, [job.id, job.worker, job.attempt, images.map(\.path), images.map { String($0.sizeBytes) },
                  images.map(\.sha256), images.map(\.format),
                  // Hex digits or NULL: nothing to quote in the array literal.
                  "{" + images.map { $0.pathBytes.map(hex) ?? "NULL" }.joined(separator: ",") + "}"])
        return rows.affected == images.count
    }

    /// The images recorded for a job, ordered by path.
    public static func images(_ c: PostgresConnection, jobID: Int64) throws -> [ImageRecord] {
        let rows = try c.query("""
            SELECT path, size_bytes, sha256, format, encode(path_bytes, 'hex') AS raw
            FROM nola.images WHERE job_id = $1 ORDER BY path
            """, [jobID])
        return try rows.rows.map {
            ImageRecord(path: try $0.string("path"), sizeBytes: try $0.int("size_bytes"),
                        sha256: try $0.string("sha256"), format: try $0.string("format"),
                        pathBytes: try $0.optionalString("raw").map(unhex))
        }
    }

    private static func hex(_ bytes: [UInt8]) -> String {
        bytes.map { String(format: "%02x", $0) }.joined()
    }

    private static func unhex(_ text: String) -> [UInt8] {
        func value(_ d: UInt8) -> UInt8 { d <= 0x39 ? d - 0x30 : (d | 0x20) - 0x61 + 10 }
        let digits = Array(text.utf8)
        return stride(from: 0, to: digits.count - 1, by: 2).map { value(digits[$0]) << 4 | value(digits[$0 + 1]) }
    }

    /// The jobs whose label rows an incremental job (`prompts_from_job` + `only_new`) may copy: the job
    /// that tuned the prompts and every succeeded job that labelled with them (so a chain of increments
    /// never labels an image twice); one row per image content, the prompts job's first. As SQL, with
    /// the prompts job as parameter `$n`.
    static func labelSources(_ n: Int) -> String {
        """
        SELECT DISTINCT ON (i.sha256) i.sha256, l.label, l.confidence, l.zero_shot_label, l.zero_shot_confidence,
            l.top_labels, l.top_probabilities, l.margin, l.teacher_label, l.agreement
        FROM nola.labels l JOIN nola.images i ON i.job_id = l.job_id AND i.path = l.path
        WHERE l.label IS NOT NULL AND l.job_id IN (
            SELECT id FROM nola.jobs WHERE id = $\(n)
                OR (state = 'succeeded' AND parameters -> 'prompts_from_job' = to_jsonb($\(n)::bigint)))
        ORDER BY i.sha256, l.job_id, l.path
        """
    }

    /// A label an earlier job gave to an image's content (`labelSources`).
    public struct ReusableLabel: Sendable, Equatable {
        public let label: String
        public let confidence: Double
        public let zeroShotLabel: String?
    }

    /// By SHA-256: the labels that the jobs labelling with job `promptsJob`'s prompts have already given
    /// to image contents (`labelSources`).
    public static func reusableLabels(_ c: PostgresConnection, promptsJob: Int64) throws -> [String: ReusableLabel] {
        let rows = try c.query("SELECT sha256, label, confidence::float8 AS confidence, zero_shot_label FROM (\(labelSources(1))) s",
                               [promptsJob])
        var out: [String: ReusableLabel] = [:]
        for row in rows.rows {
            out[try row.string("sha256")] = ReusableLabel(label: try row.string("label"), confidence: try row.optionalDouble("confidence") ?? 0,
                                                          zeroShotLabel: try row.optionalString("zero_shot_label"))
        }
        return out
    }

    /// Copies, for these paths of the job, the label row of an image with the same content from
    /// `labelSources` (label, confidence, zero-shot label and confidence, exactly as stored); returns the
    /// rows written: 0 when the job is no longer ours, fewer than the paths when a source row has gone.
    public static func copyLabels(_ c: PostgresConnection, _ job: JobRef, promptsJob: Int64, paths: [String]) throws -> Int {
        if paths.isEmpty { return 0 }
        let rows = try c.query("""
            INSERT INTO nola.labels (job_id, path, label, confidence, zero_shot_label, zero_shot_confidence, unreadable,
                                     top_labels, top_probabilities, margin, teacher_label, agreement, abstained)
            SELECT $1, i.path, s.label, s.confidence, s.zero_shot_label, s.zero_shot_confidence, NULL,
                   s.top_labels, s.top_probabilities, s.margin, s.teacher_label, s.agreement, NULL
            FROM nola.images i JOIN (\(labelSources(5))) s ON s.sha256 = i.sha256
            WHERE i.job_id = $1 AND i.path = ANY ($4::text[]) AND \(owned)
            ON CONFLICT (job_id, path) DO UPDATE
                SET label = EXCLUDED.label, confidence = EXCLUDED.confidence, zero_shot_label = EXCLUDED.zero_shot_label,
                    zero_shot_confidence = EXCLUDED.zero_shot_confidence, unreadable = NULL,
                    top_labels = EXCLUDED.top_labels, top_probabilities = EXCLUDED.top_probabilities, margin = EXCLUDED.margin,
                    teacher_label = EXCLUDED.teacher_label, agreement = EXCLUDED.agreement, abstained = NULL
            """, [job.id, job.worker, job.attempt, paths, promptsJob])
        return rows.affected
    }

    /// Upserts a batch of labels (paths must be images of the job); false when the job is no longer ours.
    @discardableResult
    public static func insertLabels(_ c: PostgresConnection, _ job: JobRef, _ labels: [LabelRecord]) throws -> Bool {
        if labels.isEmpty { return try JobStore.isOwned(c, job) }
        func floats(_ values: [Float?]) -> String {
            "{" + values.map { $0.map { String($0) } ?? "NULL" }.joined(separator: ",") + "}"
        }
        func quoted(_ v: String) -> String {
            "\"" + v.replacingAll("\\", with: "\\\\").replacingAll("\"", with: "\\\"") + "\""
        }
        func texts(_ values: [String?]) -> String {
            "{" + values.map { v in v.map(quoted) ?? "NULL" }.joined(separator: ",") + "}"
        }
        func bools(_ values: [Bool?]) -> String {
            "{" + values.map { $0.map { $0 ? "t" : "f" } ?? "NULL" }.joined(separator: ",") + "}"
        }
        // The top lists travel as one JSON array per row (arrays of arrays cannot be ragged in PostgreSQL).
        func jsonLists<T>(_ values: [[T]?], _ element: (T) -> JSONValue) -> String {
            texts(values.map { $0.map { JSONValue.array($0.map(element)).jsonText } })
        }
        let rows = try c.query("""
            INSERT INTO nola.labels (job_id, path, label, confidence, zero_shot_label, zero_shot_confidence, unreadable,
                                     top_labels, top_probabilities, margin, teacher_label, agreement, abstained)
            SELECT $1, u.path, u.label, u.confidence, u.zs_label, u.zs_confidence, u.unreadable,
                   (SELECT array_agg(e ORDER BY o) FROM jsonb_array_elements_text(u.top_labels::jsonb) WITH ORDINALITY AS t(e, o)),
                   (SELECT array_agg(e::real ORDER BY o) FROM jsonb_array_elements_text(u.top_probabilities::jsonb) WITH ORDINALITY AS t(e, o)),
                   u.margin, u.teacher, u.agreement, u.abstained
            FROM unnest($4::text[], $5::text[], $6::real[], $7::text[], $8::real[], $9::text[],
                        $10::text[], $11::text[], $12::real[], $13::text[], $14::boolean[], $15::text[])
                AS u(path, label, confidence, zs_label, zs_confidence, unreadable, top_labels, top_probabilities, margin, teacher, agreement, abstained)
            WHERE \(owned)
            ON CONFLICT (job_id, path) DO UPDATE
                SET label = EXCLUDED.label, confidence = EXCLUDED.confidence, zero_shot_label = EXCLUDED.zero_shot_label,
                    zero_shot_confidence = EXCLUDED.zero_shot_confidence, unreadable = EXCLUDED.unreadable,
                    top_labels = EXCLUDED.top_labels, top_probabilities = EXCLUDED.top_probabilities, margin = EXCLUDED.margin,
                    teacher_label = EXCLUDED.teacher_label, agreement = EXCLUDED.agreement, abstained = EXCLUDED.abstained
            """, [job.id, job.worker, job.attempt, labels.map(\.path), texts(labels.map(\.label)),
                  floats(labels.map(\.confidence)), texts(labels.map(\.zeroShotLabel)),
                  floats(labels.map(\.zeroShotConfidence)), texts(labels.map(\.unreadable)),
                  jsonLists(labels.map(\.topLabels)) { .string($0) },
                  jsonLists(labels.map(\.topProbabilities)) { .number(Double($0)) },
                  floats(labels.map(\.margin)), texts(labels.map(\.teacherLabel)), bools(labels.map(\.agreement)),
                  texts(labels.map(\.abstained))])
        return rows.affected == labels.count
    }

    /// Stores (or replaces) the job's tuned prompts. `shapes`, `backbone` and `parameters` are JSON objects.
    @discardableResult
    public static func savePrompts(_ c: PostgresConnection, _ job: JobRef, safetensors: [UInt8],
                                   shapes: JSONValue, backbone: JSONValue, parameters: JSONValue) throws -> Bool {
        let rows = try c.query("""
            INSERT INTO nola.prompts (job_id, safetensors, shapes, backbone, parameters)
            SELECT $1, $4, $5::jsonb, $6::jsonb, $7::jsonb WHERE \(owned)
            ON CONFLICT (job_id) DO UPDATE SET safetensors = EXCLUDED.safetensors, shapes = EXCLUDED.shapes,
                backbone = EXCLUDED.backbone, parameters = EXCLUDED.parameters, created_at = now()
            """, [job.id, job.worker, job.attempt, PostgresValue.bytes(safetensors), shapes.jsonText,
                  backbone.jsonText, parameters.jsonText])
        return rows.affected == 1
    }

    /// Cached generated descriptions of a class, or nil.
    public static func cachedDescriptions(_ c: PostgresConnection, className: String, model: String, promptVersion: String) throws -> [String]? {
        let rows = try c.query("""
            SELECT sentences::text AS s FROM nola.description_cache
            WHERE class_name = $1 AND model = $2 AND prompt_version = $3
            """, [className, model, promptVersion])
        guard !rows.isEmpty else { return nil }
        let text = try rows[0].string("s")
        guard let sentences = try? JSONDecoder().decode([String].self, from: Data(text.utf8)) else {
            throw DatabaseError(.unexpectedResult, "description_cache.sentences of class \"\(className)\" is not an array of strings")
        }
        return sentences
    }

    public static func cacheDescriptions(_ c: PostgresConnection, className: String, model: String, promptVersion: String, sentences: [String]) throws {
        try c.query("""
            INSERT INTO nola.description_cache (class_name, model, prompt_version, sentences) VALUES ($1, $2, $3, $4::jsonb)
            ON CONFLICT (class_name, model, prompt_version) DO UPDATE SET sentences = EXCLUDED.sentences, created_at = now()
            """, [className, model, promptVersion, JSONValue.array(sentences.map { .string($0) }).jsonText])
    }
}
