import Foundation

/// One numbered SQL file of Migrations/ (`0001_nola_schema.sql` → version 1).
public struct Migration: Sendable {
    public let version: Int
    public let name: String
    public let sql: String
    /// SHA-256 of the file's text, recorded when applied so an edited old migration is noticed.
    public var checksum: String { SHA256.hex(SHA256.hash(Array(sql.utf8))) }
}

/// Applies Migrations/*.sql in order, each in one transaction, under an advisory lock, recorded in
/// `nola.schema_migrations`. The schema version this build of nolad expects is `Migrator.expectedVersion`.
public enum Migrator {
    public static let expectedVersion = 13
    /// Arbitrary constant key for pg_advisory_lock, shared by every nolad.
    static let lockKey: Int64 = 0x6e6f_6c61_6d69_6772 // "nolamigr"

    /// Where the migration files are looked for, in order: the explicit folder, the folder named by
    /// NOLAD_MIGRATIONS, `<executable>/../share/nolad/migrations`, /usr/local/share/nolad/migrations,
    /// /usr/share/nolad/migrations, and the source checkout this binary was built from.
    public static func findDirectory(explicit: String? = nil) -> URL? {
        var candidates: [String] = []
        if let explicit { return URL(fileURLWithPath: explicit) }
        if let env = ProcessInfo.processInfo.environment["NOLAD_MIGRATIONS"], !env.isEmpty { return URL(fileURLWithPath: env) }
        if let exe = Bundle.main.executableURL?.resolvingSymlinksInPath() {
            candidates.append(exe.deletingLastPathComponent().appendingPathComponent("../share/nolad/migrations").standardizedFileURL.path)
        }
        candidates += ["/usr/local/share/nolad/migrations", "/usr/share/nolad/migrations"]
        candidates.append(URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../Migrations").standardizedFileURL.path)
        for path in candidates {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue {
                return URL(fileURLWithPath: path)
            }
        }
        return nil
    }

    /// Reads `NNNN_name.sql` files; versions must run 1, 2, 3, ... without gaps or duplicates.
    public static func load(from directory: URL) throws -> [Migration] {
        let names: [String]
        do {
            names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
        } catch {
            throw DatabaseError(.badMigration, "cannot read the migrations folder \(directory.path)")
        }
        var migrations: [Migration] = []
        for name in names where name.hasSuffix(".sql") {
            guard let underscore = name.firstIndex(of: "_"), let version = Int(name[..<underscore]) else {
                throw DatabaseError(.badMigration, "migration file \(name) does not start with a version number and '_'")
            }
            guard let sql = try? String(contentsOf: directory.appendingPathComponent(name), encoding: .utf8) else {
                throw DatabaseError(.badMigration, "cannot read migration file \(name)")
            }
            migrations.append(Migration(version: version, name: String(name.dropLast(4)), sql: sql))
        }
        migrations.sort { $0.version < $1.version }
        for (i, m) in migrations.enumerated() where m.version != i + 1 {
            throw DatabaseError(.badMigration, "migration versions must be 1, 2, 3, ...: found \(m.name) at position \(i + 1)")
        }
        if migrations.count > expectedVersion {
            throw DatabaseError(.badMigration, "\(directory.path) holds migrations up to version \(migrations.count), newer than this nolad (\(expectedVersion))")
        }
        return migrations
    }

    /// The applied version (0 for an empty database).
    public static func currentVersion(_ c: PostgresConnection) throws -> Int {
        let exists = try c.query("SELECT to_regclass('nola.schema_migrations') IS NOT NULL AS present")
        guard try exists[0].bool("present") else { return 0 }
        let rows = try c.query("SELECT coalesce(max(version), 0) AS v FROM nola.schema_migrations")
        return try rows[0].int("v")
    }

    /// Applies what is missing; returns the versions applied (empty when already up to date).
    @discardableResult
    public static func migrate(_ c: PostgresConnection, migrations: [Migration]) throws -> [Int] {
        try c.query("SELECT pg_advisory_lock($1)", [lockKey])
        defer { _ = try? c.query("SELECT pg_advisory_unlock($1)", [lockKey]) }
        try c.executeScript("""
            CREATE SCHEMA IF NOT EXISTS nola;
            CREATE TABLE IF NOT EXISTS nola.schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """)
        let applied = try c.query("SELECT version, name, checksum FROM nola.schema_migrations ORDER BY version")
        var done: [Int: String] = [:]
        for row in applied.rows { done[try row.int("version")] = try row.string("checksum") }
        if let newest = done.keys.max(), newest > migrations.count {
            throw DatabaseError(.schemaMismatch, "the database schema is at version \(newest), newer than this nolad knows (\(migrations.count)); upgrade nolad")
        }
        var versions: [Int] = []
        for m in migrations {
            if let sum = done[m.version] {
                if sum != m.checksum {
                    throw DatabaseError(.badMigration, "migration \(m.name) was changed after it was applied (checksum differs)")
                }
                continue
            }
            try c.transaction {
                try c.executeScript(m.sql)
                try c.query("INSERT INTO nola.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                            [m.version, m.name, m.checksum])
            }
            versions.append(m.version)
        }
        return versions
    }

    /// What `serve` runs before claiming anything: the schema must be exactly the expected version
    /// and have the columns the code uses.
    public static func checkSchema(_ c: PostgresConnection) throws {
        let v = try currentVersion(c)
        if v < expectedVersion {
            throw DatabaseError(.schemaMismatch, "the database schema is at version \(v) but this nolad needs \(expectedVersion); run `nolad migrate`")
        }
        if v > expectedVersion {
            throw DatabaseError(.schemaMismatch, "the database schema is at version \(v), newer than this nolad knows (\(expectedVersion)); upgrade nolad")
        }
        let actual = try SchemaCatalog.columns(c)
        for (relation, columns) in SchemaCatalog.expected {
            guard let have = actual[relation] else {
                throw DatabaseError(.schemaMismatch, "nola.\(relation) is missing although the schema is at version \(v); repair the database or rerun `nolad migrate` on a fresh one")
            }
            for column in columns where !have.contains(column) {
                throw DatabaseError(.schemaMismatch, "nola.\(relation) lacks column \(column) although the schema is at version \(v)")
            }
        }
    }
}

/// The relations of schema `nola` and their columns ("name type"), as the code expects them.
public enum SchemaCatalog {
    public static let expected: [String: [String]] = [
        "schema_migrations": ["version integer", "name text", "checksum text", "applied_at timestamp with time zone"],
        "jobs": [
            "id bigint", "collection text", "classes text[]", "descriptions jsonb", "parameters jsonb",
            "priority integer", "run_after timestamp with time zone", "max_attempts integer", "timeout interval",
            "submitted_by text", "submitted_at timestamp with time zone", "state nola.job_state", "attempt integer",
            "attempts_used integer", "worker text", "lease_expires_at timestamp with time zone",
            "heartbeat_at timestamp with time zone", "started_at timestamp with time zone",
            "finished_at timestamp with time zone", "stage text", "stage_index integer", "stage_count integer",
            "stage_started_at timestamp with time zone", "stage_done bigint", "stage_total bigint",
            "cancel_requested boolean", "error text",
        ],
        "attempts": ["job_id bigint", "attempt integer", "worker text", "started_at timestamp with time zone",
                     "finished_at timestamp with time zone", "outcome text", "error text"],
        "events": ["id bigint", "job_id bigint", "attempt integer", "worker text", "at timestamp with time zone",
                   "stage text", "kind text", "metrics jsonb"],
        "workers": ["id text", "name text", "host text", "pid integer", "version text", "started_at timestamp with time zone",
                    "heartbeat_at timestamp with time zone", "stopped_at timestamp with time zone", "current_jobs bigint[]",
                    "helping_jobs bigint[]"],
        "images": ["job_id bigint", "path text", "size_bytes bigint", "sha256 text", "format text", "path_bytes bytea"],
        "labels": ["job_id bigint", "path text", "label text", "confidence real", "zero_shot_label text",
                   "zero_shot_confidence real", "unreadable text", "top_labels text[]", "top_probabilities real[]",
                   "margin real", "teacher_label text", "agreement boolean", "abstained text"],
        "review_queue": ["job_id bigint", "review_rank bigint", "path text", "label text", "abstained text",
                         "confidence real", "margin real", "agreeing integer", "top_labels text[]", "top_probabilities real[]",
                         "zero_shot_label text", "zero_shot_confidence real", "teacher_label text", "agreement boolean"],
        "prompts": ["job_id bigint", "safetensors bytea", "shapes jsonb", "backbone jsonb", "parameters jsonb",
                    "created_at timestamp with time zone"],
        "checkpoints": ["job_id bigint", "blob bytea", "epoch integer", "step integer", "updated_at timestamp with time zone"],
        "tuning_parameters": ["job_id bigint", "attempt integer", "step integer", "blob bytea", "updated_at timestamp with time zone"],
        "tuning_units": ["job_id bigint", "attempt integer", "step integer", "unit integer", "epoch integer", "logical_batch integer",
                         "images integer[]", "targets integer[]", "files bytea[]", "state text", "worker text",
                         "lease_expires_at timestamp with time zone", "claims integer", "result bytea", "seconds double precision",
                         "created_at timestamp with time zone", "finished_at timestamp with time zone"],
        "feature_cache": ["model text", "sha256 text", "view text", "dimension integer", "features bytea",
                          "created_at timestamp with time zone"],
        "description_cache": ["class_name text", "model text", "prompt_version text", "sentences jsonb",
                              "created_at timestamp with time zone"],
        "parameter_schema": ["name text", "kind text", "minimum numeric", "maximum numeric", "exclusive_minimum boolean",
                             "exclusive_maximum boolean", "nullable boolean"],
        "job_status": ["id bigint", "collection text", "state nola.job_state", "stage text", "progress numeric",
                       "images_done bigint", "images_total bigint", "rate numeric", "eta interval", "worker text",
                       "last_heartbeat timestamp with time zone", "attempt integer", "attempts_used integer",
                       "max_attempts integer", "cancel_requested boolean", "error text",
                       "submitted_at timestamp with time zone", "started_at timestamp with time zone",
                       "finished_at timestamp with time zone", "shards_done bigint", "shards_total bigint",
                       "workers_contributing bigint", "worker_rates jsonb", "tuning_step integer", "tuning_units_done bigint",
                       "tuning_units_total bigint"],
        "tuning_workers": ["job_id bigint", "attempt integer", "worker text", "units bigint", "views bigint",
                           "seconds double precision", "last_at timestamp with time zone", "error text"],
        "shard_inputs": ["job_id bigint", "stage text", "key text", "clip_model text", "dino_model text", "model_keys text[]",
                         "blob bytea", "created_at timestamp with time zone"],
        "shards": ["job_id bigint", "stage text", "index integer", "paths text[]", "state text", "worker text", "claims integer",
                   "lease_expires_at timestamp with time zone", "started_at timestamp with time zone",
                   "finished_at timestamp with time zone", "seconds double precision", "result bytea", "unreadable jsonb",
                   "error text"],
    ]

    /// Every table and view of schema `nola` with its columns in order, read from the catalog.
    public static func columns(_ c: PostgresConnection) throws -> [String: [String]] {
        let rows = try c.query("""
            SELECT cl.relname AS relation, a.attname || ' ' || format_type(a.atttypid, a.atttypmod) AS col
            FROM pg_class cl
            JOIN pg_namespace n ON n.oid = cl.relnamespace
            JOIN pg_attribute a ON a.attrelid = cl.oid AND a.attnum > 0 AND NOT a.attisdropped
            WHERE n.nspname = 'nola' AND cl.relkind IN ('r', 'v', 'p')
            ORDER BY cl.relname, a.attnum
            """)
        var out: [String: [String]] = [:]
        for row in rows.rows { out[try row.string("relation"), default: []].append(try row.string("col")) }
        return out
    }

    /// A textual fingerprint of everything in schema `nola` (relations, columns, constraints, indexes,
    /// functions, triggers, grants), for tests that compare two databases or one database over time.
    public static func fingerprint(_ c: PostgresConnection) throws -> [String] {
        let rows = try c.query("""
            SELECT 'column ' || cl.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                   || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                   || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
                   || coalesce(' acl ' || a.attacl::text, '') AS item
            FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace
            JOIN pg_attribute a ON a.attrelid = cl.oid AND a.attnum > 0 AND NOT a.attisdropped
            LEFT JOIN pg_attrdef d ON d.adrelid = cl.oid AND d.adnum = a.attnum
            WHERE n.nspname = 'nola'
            UNION ALL
            SELECT 'constraint ' || cl.relname || '.' || co.conname || ' ' || pg_get_constraintdef(co.oid)
            FROM pg_constraint co JOIN pg_class cl ON cl.oid = co.conrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
            WHERE n.nspname = 'nola'
            UNION ALL
            SELECT 'index ' || pg_get_indexdef(i.indexrelid)
            FROM pg_index i JOIN pg_class cl ON cl.oid = i.indrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
            WHERE n.nspname = 'nola'
            UNION ALL
            SELECT 'function ' || p.oid::regprocedure::text || ' ' || md5(pg_get_functiondef(p.oid))
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'nola'
            UNION ALL
            SELECT 'trigger ' || pg_get_triggerdef(t.oid)
            FROM pg_trigger t JOIN pg_class cl ON cl.oid = t.tgrelid JOIN pg_namespace n ON n.oid = cl.relnamespace
            WHERE n.nspname = 'nola' AND NOT t.tgisinternal
            UNION ALL
            SELECT 'view ' || cl.relname || ' ' || md5(pg_get_viewdef(cl.oid))
            FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace WHERE n.nspname = 'nola' AND cl.relkind = 'v'
            UNION ALL
            SELECT 'grant ' || cl.relname || ' ' || coalesce(cl.relacl::text, '')
            FROM pg_class cl JOIN pg_namespace n ON n.oid = cl.relnamespace WHERE n.nspname = 'nola'
            UNION ALL
            SELECT 'migrations ' || count(*)::text FROM nola.schema_migrations
            ORDER BY 1
            """)
        return try rows.rows.map { try $0.string("item") }
    }
}
