import Foundation
import Method
import Models
import Queue
import XCTest

/// Fixtures of reference/make_pipeline_fixtures.py: tiny random CLIP (with a byte-level tokenizer) and DINO,
/// and a 3-class collection of 18 small images plus one truncated JPEG.
let pipelineFixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")

/// A chat-completions endpoint on loopback: answers every question with two sentences and records the
/// questions it was asked.
final class FakeLLMServer: @unchecked Sendable {
    let port: UInt16
    private let fd: Int32
    private let lock = NSLock()
    private var questions: [String] = []
    var asked: [String] { lock.withLock { questions } }

    init() throws {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        self.fd = fd
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard bound == 0, listen(fd, 16) == 0 else { throw TestSetupError("fake LLM server: cannot bind/listen") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        port = UInt16(bigEndian: address.sin_port)
        let thread = Thread { [self] in serve() }
        thread.start()
    }

    private func serve() {
        while true {
            let client = accept(fd, nil, nil)
            if client < 0 { return }
            var data = [UInt8]()
            var buffer = [UInt8](repeating: 0, count: 65536)
            var bodyStart: Int?
            var contentLength = 0
            while true {
                let n = read(client, &buffer, buffer.count)
                if n <= 0 { break }
                data += buffer[0..<n]
                if bodyStart == nil, let range = String(decoding: data, as: UTF8.self).range(of: "\r\n\r\n") {
                    let head = String(decoding: data, as: UTF8.self)[..<range.lowerBound]
                    bodyStart = head.utf8.count + 4
                    for line in head.split(separator: "\r\n") where line.lowercased().hasPrefix("content-length:") {
                        contentLength = Int(line.split(separator: ":")[1].trimmingCharacters(in: .whitespaces)) ?? 0
                    }
                }
                if let bodyStart, data.count >= bodyStart + contentLength { break }
            }
            var question = ""
            if let bodyStart, let body = try? JSONSerialization.jsonObject(with: Data(data[bodyStart...])) as? [String: Any],
               let messages = body["messages"] as? [[String: Any]], let last = messages.last?["content"] as? String {
                question = last
            }
            lock.withLock { questions.append(question) }
            let answer = "It is a thing seen in the question \(question.count). - It has a clear shape and colour."
            let reply = try! JSONSerialization.data(withJSONObject: ["choices": [["index": 0, "message": ["role": "assistant", "content": answer]]]])
            let response = Array("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: \(reply.count)\r\nConnection: close\r\n\r\n".utf8) + Array(reply)
            _ = response.withUnsafeBytes { write(client, $0.baseAddress, $0.count) }
            close(client)
        }
    }
}

extension DatabaseTestCase {
    func events(_ id: Int64, kind: String? = nil) throws -> [(stage: String, kind: String, attempt: Int, metrics: [String: Any])] {
        let rows = try db.query("SELECT coalesce(stage, '') AS stage, kind, attempt, metrics::text AS m FROM nola.events WHERE job_id = $1 ORDER BY id", [id])
        return try rows.rows.compactMap { row in
            let k = try row.string("kind")
            if let kind, k != kind { return nil }
            let metrics = try JSONSerialization.jsonObject(with: Data(try row.string("m").utf8)) as? [String: Any] ?? [:]
            return (try row.string("stage"), k, try row.int("attempt"), metrics)
        }
    }

    func waitSucceeded(_ id: Int64, timeout: Double) throws {
        let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: timeout)
        let error = try row.optionalString("error") ?? ""
        XCTAssertEqual(try row.string("state"), "succeeded", "job \(id): \(error)")
    }
}

final class PipelineTests: DatabaseTestCase {
    static let classes = ["red ball", "green leaf", "blue sky"]

    /// The fixture collection copied under the test's collection root.
    func copyCollection() throws -> String {
        let path = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: path)
        return path
    }

    func startPipelineDaemon(_ name: String, extra: [String: String] = [:]) throws -> DaemonProcess {
        var settings = ["pipeline": "nola", "model_root": pipelineFixtures.appendingPathComponent("models").path,
                        "clip_model": "tiny-clip", "dino_model": "tiny-dino", "threads": "2", "checkpoint_seconds": "0.5"]
        for (k, v) in extra { settings[k] = v }
        return try startDaemon(name, settings: settings)
    }

    func submit(_ collection: String, parameters: String, descriptions: String? = nil) throws -> Int64 {
        let rows = try db.query("""
            INSERT INTO nola.jobs (collection, classes, parameters, descriptions, max_attempts) VALUES ($1, $2, $3::jsonb, $4::jsonb, 3) RETURNING id
            """, [collection, Self.classes, parameters, descriptions])
        return Int64(try rows[0].int("id"))
    }

    func testLabellingJob_runsToCompletion_withLLMDescriptionsCachedAcrossTwoJobs() throws {
        let llm = try FakeLLMServer()
        let collection = try copyCollection()
        // Every file ends up labelled, unreadable with a reason, or counted: a zero-byte .jpg is an
        // unreadable image, a text file is counted as not an image, a JPEG whose name is not UTF-8 is
        // labelled under its escaped name (a copy of another sky with a byte appended after its end, so
        // its content is new).
        FileManager.default.createFile(atPath: collection + "/green_leaf/empty.jpg", contents: Data())
        FileManager.default.createFile(atPath: collection + "/notes.txt", contents: Data("not a picture".utf8))
        let latin1: [UInt8] = Array((collection + "/blue_sky/caf").utf8) + [0xE9, 0x2E, 0x6A, 0x70, 0x67, 0]
        let fd = latin1.withUnsafeBufferPointer { $0.withMemoryRebound(to: CChar.self) { open($0.baseAddress!, O_CREAT | O_WRONLY, 0o644) } }
        XCTAssertGreaterThanOrEqual(fd, 0)
        let sky = try Data(contentsOf: URL(fileURLWithPath: collection + "/blue_sky/00.jpg")) + Data([0])
        XCTAssertEqual(sky.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }, sky.count)
        close(fd)
        _ = try startPipelineDaemon("pipe-a", extra: ["llm_url": "http://127.0.0.1:\(llm.port)/v1", "llm_model": "fake-1"])
        let started = Date()
        let first = try submit(collection, parameters: #"{"prompt_epochs": 3, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 3}"#)
        try waitSucceeded(first, timeout: 180)
        print("pipeline test: job \(first) (19 images + 2 unreadable, 3 epochs) took \(String(format: "%.1f", Date().timeIntervalSince(started))) s")
        let latin1Row = try db.query("""
            SELECT l.label, encode(i.path_bytes, 'hex') AS raw FROM nola.labels l JOIN nola.images i USING (job_id, path)
            WHERE l.job_id = $1 AND l.path = $2
            """, [first, "blue_sky/caf\\xE9.jpg"])
        XCTAssertEqual(latin1Row.count, 1, "the Latin-1 name is labelled under its escaped form")
        XCTAssertEqual(try latin1Row.rows.first?.string("raw"), Array("blue_sky/caf".utf8).map { String(format: "%02x", $0) }.joined() + "e92e6a7067",
                       "with its exact bytes")
        XCTAssertTrue(Self.classes.contains(try latin1Row.rows.first?.optionalString("label") ?? ""))

        // Every image has a label row; the broken one says why it has no label.
        let labels = try db.query("SELECT path, label, confidence, zero_shot_label, unreadable FROM nola.labels WHERE job_id = $1 ORDER BY path", [first])
        XCTAssertEqual(labels.count, 21)
        for row in labels.rows {
            let path = try row.string("path")
            if path == "red_ball/bad.jpg" || path == "green_leaf/empty.jpg" {
                XCTAssertNil(try row.optionalString("label"))
                XCTAssertFalse(try row.string("unreadable").isEmpty)
            } else {
                XCTAssertTrue(Self.classes.contains(try row.string("label")), path)
                XCTAssertTrue(Self.classes.contains(try row.string("zero_shot_label")), path)
                let confidence = try row.double("confidence")
                XCTAssertTrue(confidence > 0 && confidence <= 1, "\(path): \(confidence)")
            }
        }

        // The tuned prompts are a safetensors file our reader (and Python's) loads, with the backbone identity.
        let prompts = try db.query("SELECT safetensors, backbone::text AS b, shapes::text AS s FROM nola.prompts WHERE job_id = $1", [first])
        XCTAssertEqual(prompts.count, 1)
        let blob = try prompts[0].bytes("safetensors")
        let path = root + "/prompts.safetensors"
        FileManager.default.createFile(atPath: path, contents: Data(blob))
        let file = try SafeTensorsFile(path: path)
        XCTAssertEqual(file.shape(of: "prompt_embeddings"), [16, 32])
        XCTAssertEqual(file.shape(of: "head.weight"), [3, 16])
        XCTAssertEqual(file.metadata["format"], "nolad-tuned-prompts-1")
        XCTAssertEqual(file.metadata["clip_model"], "tiny-clip")
        XCTAssertTrue(try prompts[0].string("b").contains("weights_sha256"))
        if let keep = ProcessInfo.processInfo.environment["NOLAD_TEST_KEEP_PROMPTS"] { try? FileManager.default.copyItem(atPath: path, toPath: keep) }
        XCTAssertEqual(try db.query("SELECT 1 FROM nola.checkpoints WHERE job_id = $1", [first]).count, 0, "checkpoint removed once done")

        // Events: sentences per class, pseudo-labels, alignment loss, per-epoch tuning metrics, accuracies.
        let all = try events(first)
        let describe = try XCTUnwrap(all.first { $0.stage == "describe" && $0.kind == "metrics" })
        XCTAssertEqual(describe.metrics["llm_calls"] as? Int, 3)
        let perClass = try XCTUnwrap(describe.metrics["classes"] as? [String: [String: Any]])
        XCTAssertEqual(perClass["red ball"]?["source"] as? String, "llm")
        XCTAssertGreaterThan(perClass["red ball"]?["sentences"] as? Int ?? 0, 9)
        let stage2 = try XCTUnwrap(all.first { $0.stage == "pseudolabel" && $0.kind == "metrics" })
        XCTAssertEqual((stage2.metrics["alignment_loss"] as? [Any])?.count, 5)
        XCTAssertNotNil(stage2.metrics["accuracy_zero_shot"])
        XCTAssertNotNil(stage2.metrics["accuracy_alignment_module"])
        XCTAssertNotNil(stage2.metrics["accuracy_pseudo_labels"])
        let epochs = all.filter { $0.stage == "tune" && $0.kind == "epoch" }
        XCTAssertEqual(epochs.map { $0.metrics["epoch"] as? Int }, [1, 2, 3])
        XCTAssertNotNil(epochs.last?.metrics["agreement"])
        XCTAssertNotNil(epochs.last?.metrics["loss"])
        let final = try XCTUnwrap(all.first { $0.stage == "label" && $0.kind == "metrics" })
        XCTAssertEqual(final.metrics["labelled"] as? Int, 19)
        XCTAssertEqual(final.metrics["unreadable"] as? Int, 2)
        let discovered = try XCTUnwrap(all.first { $0.stage == "discover" && $0.kind == "metrics" })
        XCTAssertEqual(discovered.metrics["images"] as? Int, 21)
        XCTAssertEqual(discovered.metrics["not_images"] as? Int, 1)
        XCTAssertEqual(discovered.metrics["names_not_utf8"] as? Int, 1)
        XCTAssertEqual(discovered.metrics["names_not_utf8_escaped"] as? [String], ["blue_sky/caf\\xE9.jpg"])
        XCTAssertNotNil(final.metrics["accuracy_final"])
        let encode = try XCTUnwrap(all.first { $0.stage == "encode" && $0.kind == "metrics" })
        XCTAssertEqual(encode.metrics["encoded"] as? Int, 19)

        // A second job on the same classes: descriptions come from the cache (no new LLM request), features
        // from the feature cache, and the prompts of the first job label the collection (inference only).
        let questionsAfterFirst = llm.asked.count
        XCTAssertEqual(questionsAfterFirst, 3 * 5, "five CuPL questions per class")
        let second = try submit(collection, parameters: "{\"prompts_from_job\": \(first)}")
        try waitSucceeded(second, timeout: 120)
        XCTAssertEqual(llm.asked.count, questionsAfterFirst, "the second job asks the LLM nothing")
        for c in Self.classes { XCTAssertEqual(llm.asked.filter { $0.contains(c) }.count, 5, c) }
        let secondEvents = try events(second)
        XCTAssertEqual(secondEvents.first { $0.stage == "describe" && $0.kind == "metrics" }?.metrics["cache_hits"] as? Int, 3)
        XCTAssertEqual(secondEvents.first { $0.stage == "encode" && $0.kind == "metrics" }?.metrics["from_cache"] as? Int, 19)
        XCTAssertTrue(secondEvents.filter { $0.stage == "tune" && $0.kind == "epoch" }.isEmpty)
        // Same prompts, same weak views: the same labels as the first job.
        let same = try db.query("""
            SELECT count(*) AS n FROM nola.labels a JOIN nola.labels b USING (path)
            WHERE a.job_id = $1 AND b.job_id = $2 AND a.label = b.label
            """, [first, second])
        XCTAssertEqual(try same[0].int("n"), 19)

        // Same seed, same inputs: the same labels and confidences (training included).
        let third = try submit(collection, parameters: #"{"prompt_epochs": 3, "prompt_batch_size": 8, "alignment_epochs": 5, "min_k": 2, "seed": 3}"#)
        try waitSucceeded(third, timeout: 120)
        let identical = try db.query("""
            SELECT count(*) AS n FROM nola.labels a JOIN nola.labels b USING (path)
            WHERE a.job_id = $1 AND b.job_id = $2 AND a.label = b.label AND a.confidence = b.confidence
            """, [first, third])
        XCTAssertEqual(try identical[0].int("n"), 19)
    }

    func testKill9_midPromptTuning_anotherDaemonResumesFromTheCheckpoint() throws {
        let collection = try copyCollection()
        let a = try startPipelineDaemon("pipe-a")
        let epochs = 150
        let id = try submit(collection, parameters: "{\"prompt_epochs\": \(epochs), \"prompt_batch_size\": 6, \"alignment_epochs\": 2, \"min_k\": 2}")
        var seen = 0
        try waitUntil("prompt tuning passed epoch 3", timeout: 120, poll: 0.02) {
            seen = try events(id, kind: "epoch").count
            return seen >= 3
        }
        a.signal(SIGKILL)
        _ = a.waitExit(timeout: 10)
        let killedAt = try events(id, kind: "epoch").count
        _ = try startPipelineDaemon("pipe-b")
        try waitSucceeded(id, timeout: 240)
        let resumed = try XCTUnwrap(try events(id, kind: "resumed").first, "a resumed event")
        let epoch = try XCTUnwrap(resumed.metrics["epoch"] as? Int)
        print("pipeline test: killed after \(killedAt) epoch events; resumed at epoch \(epoch)")
        XCTAssertGreaterThanOrEqual(epoch, 3)
        // The checkpoint of an epoch is saved just before its event, so it may be one epoch ahead of the events.
        XCTAssertLessThanOrEqual(epoch, killedAt + 1)
        XCTAssertEqual(resumed.attempt, 2)
        let epochEvents = try events(id, kind: "epoch")
        XCTAssertEqual(epochEvents.filter { $0.attempt == 2 }.count, epochs - epoch, "the second attempt runs only the remaining epochs")
        XCTAssertEqual(epochEvents.last?.metrics["epoch"] as? Int, epochs)
        XCTAssertEqual(try db.query("SELECT 1 FROM nola.labels WHERE job_id = $1", [id]).count, 19)
    }

    func testSigterm_midPromptTuning_releasesTheJob_andTheNextDaemonResumes() throws {
        let collection = try copyCollection()
        let a = try startPipelineDaemon("pipe-a")
        let id = try submit(collection, parameters: #"{"prompt_epochs": 150, "prompt_batch_size": 6, "alignment_epochs": 2, "min_k": 2}"#)
        try waitUntil("prompt tuning passed epoch 3", timeout: 120, poll: 0.02) { try events(id, kind: "epoch").count >= 3 }
        a.signal(SIGTERM)
        XCTAssertEqual(a.waitExit(timeout: 15), 0, "the daemon exits cleanly after SIGTERM")
        let released = try job(id)
        XCTAssertEqual(try released.string("state"), "queued")
        XCTAssertEqual(try released.int("attempts_used"), 0, "a release does not burn an attempt")
        let saved = try db.query("SELECT epoch, step FROM nola.checkpoints WHERE job_id = $1", [id])
        XCTAssertEqual(saved.count, 1)
        let savedStep = try saved[0].int("step")
        _ = try startPipelineDaemon("pipe-b")
        try waitSucceeded(id, timeout: 240)
        let resumed = try XCTUnwrap(try events(id, kind: "resumed").first)
        XCTAssertEqual(resumed.metrics["step"] as? Int, savedStep, "resumed from the step saved at SIGTERM")
        XCTAssertGreaterThanOrEqual(resumed.metrics["epoch"] as? Int ?? 0, 3)
        XCTAssertEqual(try events(id, kind: "epoch").last?.metrics["epoch"] as? Int, 150)
    }

    /// A stop checkpoint that cannot be written is logged and recorded as an event; the stop still
    /// happens. A trigger refuses every checkpoint write within an epoch (an update that keeps the
    /// epoch; the save at an epoch's end moves it on), so a cancel mid-epoch finds its save refused.
    func testStopCheckpointThatCannotBeSaved_isRecordedInTheJobsEvents() throws {
        try db.query("""
            CREATE FUNCTION refuse_mid_epoch_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF TG_OP = 'UPDATE' AND NEW.epoch = OLD.epoch THEN RAISE EXCEPTION 'checkpoint write refused by the test (step %)', NEW.step; END IF;
                RETURN NEW;
            END $$
            """)
        try db.query("CREATE TRIGGER refuse_mid_epoch BEFORE INSERT OR UPDATE ON nola.checkpoints FOR EACH ROW EXECUTE FUNCTION refuse_mid_epoch_checkpoint()")
        let collection = try copyCollection()
        _ = try startPipelineDaemon("pipe-a", extra: ["checkpoint_seconds": "3600"])
        // A cancel right at an epoch's end saves nothing (nothing is unsaved); try again then.
        for round in 1...6 {
            let id = try submit(collection, parameters: #"{"prompt_epochs": 150, "prompt_batch_size": 2, "alignment_epochs": 2, "min_k": 2}"#)
            try waitUntil("prompt tuning passed epoch 2", timeout: 120, poll: 0.02) { try events(id, kind: "epoch").count >= 2 }
            // Away from the epoch's end, which the event has just marked.
            Thread.sleep(forTimeInterval: 0.04 * Double(round))
            try db.query("SELECT nola.cancel($1)", [id])
            let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 60)
            let error = try row.optionalString("error") ?? ""
            XCTAssertEqual(try row.string("state"), "cancelled", "the stop wins over the failed save: \(error)")
            let saved = try db.query("SELECT step FROM nola.checkpoints WHERE job_id = $1", [id])
            XCTAssertEqual(saved.count, 1, "the last epoch's checkpoint is kept")
            let savedStep = try saved[0].int("step")
            guard let unsaved = try events(id, kind: "checkpoint_not_saved").first else {
                print("pipeline test: round \(round) stopped at an epoch's end (checkpoint step \(savedStep)); again")
                continue
            }
            let step = try XCTUnwrap(unsaved.metrics["step"] as? Int)
            print("pipeline test: stop checkpoint at step \(step) refused; the job keeps step \(savedStep)")
            XCTAssertGreaterThan(step, savedStep)
            XCTAssertEqual(unsaved.metrics["saved_step"] as? Int, savedStep)
            XCTAssertTrue((unsaved.metrics["error"] as? String ?? "").contains("checkpoint write refused by the test"),
                          "\(unsaved.metrics)")
            return
        }
        XCTFail("six cancels all landed at an epoch's end")
    }

    /// A copy of fixture model `from` under `models/name`, its config.json and weights edited.
    func brokenModel(_ models: String, from: String, _ name: String, config edit: (inout [String: Any]) -> Void = { _ in },
                     weights: ((SafeTensorsFile) throws -> [UInt8])? = nil) throws {
        let folder = models + "/" + name
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("models/\(from)").path, toPath: folder)
        let configURL = URL(fileURLWithPath: folder + "/config.json")
        var config = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: configURL)) as? [String: Any])
        edit(&config)
        try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys]).write(to: configURL)
        if let weights {
            let url = URL(fileURLWithPath: folder + "/model.safetensors")
            let bytes = try weights(try SafeTensorsFile(url: url))
            try FileManager.default.removeItem(at: url)
            try Data(bytes).write(to: url)
        }
    }

    /// The float tensors of `file` with one of them replaced by `shape` (values all 0.01).
    func replacing(_ file: SafeTensorsFile, _ name: String, shape: [Int]) throws -> [UInt8] {
        var tensors: [(name: String, shape: [Int], values: [Float])] = []
        for n in file.tensorNames.sorted() where ["F32", "F16", "BF16"].contains(file.dtype(of: n) ?? "") {
            if n == name {
                tensors.append((n, shape, [Float](repeating: 0.01, count: shape.reduce(1, *))))
            } else {
                tensors.append((n, file.shape(of: n)!, try file.floats(n)))
            }
        }
        XCTAssertTrue(tensors.contains { $0.name == name }, name)
        return writeSafeTensors(tensors: tensors)
    }

    func testBadInputs_failWithMessagesNamingThem_andTheDaemonKeepsServing() throws {
        let collection = try copyCollection()
        // A model root holding the fixture models and broken copies of them, one break each. Those marked
        // † used to reach a precondition when the model ran and abort the whole daemon, every job with it.
        let models = root + "/../models-\(dbname)"
        try FileManager.default.createDirectory(atPath: models, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: models) }
        for name in ["tiny-clip", "tiny-dino"] {
            try FileManager.default.createSymbolicLink(atPath: models + "/" + name, withDestinationPath: pipelineFixtures.appendingPathComponent("models/\(name)").path)
        }
        // † One token more in vocab.json than config.json's vocab_size (and the weights) hold.
        try brokenModel(models, from: "tiny-clip", "small-vocab")
        let vocabURL = URL(fileURLWithPath: models + "/small-vocab/vocab.json")
        var vocab = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: vocabURL)) as? [String: Int])
        let vocabSize = vocab.count
        vocab["zzzextra</w>"] = vocabSize
        try JSONSerialization.data(withJSONObject: vocab).write(to: vocabURL)
        // Weights cut short: the safetensors header says it is longer than the file.
        try brokenModel(models, from: "tiny-clip", "truncated-clip") { file in
            Array([UInt8](try Data(contentsOf: URL(fileURLWithPath: file.path)))[0..<100])
        }
        let tinyCLIPWeights = [UInt8](try Data(contentsOf: pipelineFixtures.appendingPathComponent("models/tiny-clip/model.safetensors")))
        let headerLength = (0..<8).reduce(0) { $0 | Int(tinyCLIPWeights[$1]) << (8 * $1) }
        // † Four-channel images, with a patch embedding to match (the weak views are RGB).
        try brokenModel(models, from: "tiny-clip", "rgba-clip", config: { config in
            var vision = config["vision_config"] as? [String: Any] ?? [:]
            vision["num_channels"] = 4
            config["vision_config"] = vision
        }, weights: { try self.replacing($0, "vision_model.embeddings.patch_embedding.weight", shape: [32, 4, 16, 16]) })
        // † A DINO ViT whose 12-pixel patches do not tile its 32×32 input, with weights to match.
        try brokenModel(models, from: "tiny-dino", "odd-patch-dino", config: { $0["patch_size"] = 12 },
                        weights: { try self.replacing($0, "embeddings.patch_embeddings.projection.weight", shape: [24, 3, 12, 12]) })
        // A job whose prompt-tuning checkpoint (as a resumed job finds it) is damaged: it fails with the
        // sentence and the remedy rather than silently training from scratch (docs/failures.md, "Resuming").
        let training = #"{"prompt_epochs": 1, "prompt_batch_size": 8, "alignment_epochs": 1, "min_k": 2}"#
        let damaged = Int64(try db.query("""
            WITH job AS (INSERT INTO nola.jobs (collection, classes, parameters, max_attempts) VALUES ($1, $2, $3::jsonb, 3) RETURNING id)
            INSERT INTO nola.checkpoints (job_id, blob, epoch, step) SELECT id, '\\x00', 0, 0 FROM job RETURNING job_id
            """, [collection, Self.classes, training])[0].int("job_id"))

        // The smallest memory budget: a job's micro-batch of 1,024-prompt views cannot fit it.
        let daemon = try startPipelineDaemon("pipe-a", extra: ["model_root": models, "memory_budget_mb": "64"])
        let bytesPerImage = CLIPPromptEncoder(model: try CLIPModel(folder: pipelineFixtures.appendingPathComponent("models/tiny-clip")),
                                              promptCount: 1024).trainingBytesPerImage
        XCTAssertGreaterThan(bytesPerImage, 64 << 20)
        let gib = String(format: "%.1f", Double(2 * bytesPerImage) / Double(1 << 30))
        let cases: [(String, String)] = [
            (#"{"clip_model": "no-such-model"}"#, "CLIP model folder \(models)/no-such-model does not exist"),
            (#"{"clip_model": "small-vocab"}"#, "CLIP model \(models)/small-vocab: bad model config \(models)/small-vocab/vocab.json: token id \(vocabSize) is outside config.json's text_config.vocab_size \(vocabSize); vocab.json and config.json do not belong to the same model"),
            (#"{"clip_model": "truncated-clip"}"#, "CLIP model \(models)/truncated-clip: cannot read \(models)/truncated-clip/model.safetensors: header length \(headerLength) runs past the end of the file (100 bytes)"),
            (#"{"clip_model": "rgba-clip"}"#, "CLIP model \(models)/rgba-clip: bad model config \(models)/rgba-clip/config.json: vision_config.num_channels is 4; only RGB images (3 channels) are supported"),
            (#"{"dino_model": "odd-patch-dino"}"#, "DINO model \(models)/odd-patch-dino: bad model config \(models)/odd-patch-dino/config.json: image_size 32 is not a multiple of patch_size 12"),
            (#"{"prompts_from_job": 999999}"#, "parameter 'prompts_from_job': job 999999 has no tuned prompts"),
            (#"{"prompt_count": 1024, "prompt_micro_batch_size": 2, "prompt_epochs": 1, "alignment_epochs": 1, "min_k": 2}"#,
             "parameter 'prompt_micro_batch_size': 2 images need about \(gib) GiB of prompt-tuning activations, more than this worker's memory_budget_mb 64; set it to at most 1, or raise memory_budget_mb"),
        ]
        var ids: [(Int64, String, String)] = [(damaged, training, "checkpoint of job \(damaged) cannot be read as safetensors: file is 1 bytes, shorter than the 8-byte header length; DELETE FROM nola.checkpoints WHERE job_id = \(damaged) to start prompt tuning over")]
        for (parameters, message) in cases { ids.append((try submit(collection, parameters: parameters), parameters, message)) }
        for (id, parameters, message) in ids {
            let row = try waitState(id, ["succeeded", "failed"], timeout: 60)
            XCTAssertEqual(try row.string("state"), "failed", parameters)
            XCTAssertEqual(try row.optionalString("error"), message, parameters)
            XCTAssertEqual(try row.int("attempt"), 1, "bad input is not retried")
        }
        let bad = try submit(collection, parameters: "{}", descriptions: #"{"red ball": []}"#)
        let row = try waitState(bad, ["succeeded", "failed"], timeout: 60)
        XCTAssertEqual(try row.optionalString("error"), "descriptions for 'red ball': empty list of sentences")
        // Parameters at the edge of their ranges: batches and k far larger than the 18-image collection.
        let good = try submit(collection, parameters: """
            {"prompt_epochs": 1, "prompt_batch_size": 1000000, "prompt_micro_batch_size": 1000000, "alignment_epochs": 1,
             "alignment_batch_size": 1000000, "min_k": 1000000}
            """)
        try waitSucceeded(good, timeout: 120)
        XCTAssertNil(daemon.waitExit(timeout: 0), "the daemon is still running")
    }
}
