// A job whose clip_model is a MobileCLIP open_clip folder (the tiny MobileCLIP-B of
// Tests/ModelsTests/Fixtures/mobileclip-vit: timm's ConvStem + ViT, open_clip's text tower, MobileCLIP's
// preprocess_cfg) runs every stage end to end — zero-shot classifier, encode, pseudo-labels, prompt tuning on
// the ViT tower, labels — and an inference-only job reuses its tuned prompts.
import Foundation
import Models
import XCTest

final class MobileCLIPJobTests: DatabaseTestCase {
    /// mobileclip-vit with the pipeline's tiny CLIP tokenizer (its vocabulary fits the text tower's 520 ids).
    func writeMobileCLIPFolder(to folder: String) throws {
        let fm = FileManager.default
        let models = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("ModelsTests/Fixtures/mobileclip-vit")
        try fm.createDirectory(atPath: folder, withIntermediateDirectories: true)
        for name in ["open_clip_config.json", "open_clip_model.safetensors"] {
            try fm.copyItem(at: models.appendingPathComponent(name), to: URL(fileURLWithPath: folder + "/" + name))
        }
        for name in ["vocab.json", "merges.txt"] {
            try fm.copyItem(at: pipelineFixtures.appendingPathComponent("models/tiny-clip/" + name), to: URL(fileURLWithPath: folder + "/" + name))
        }
    }

    func testJob_withAMobileCLIPFolder_labelsEndToEnd_andAnInferenceOnlyJobReusesItsPrompts() throws {
        let models = root + "/../models-\(dbname)"
        try FileManager.default.createDirectory(atPath: models, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: models) }
        try FileManager.default.createSymbolicLink(atPath: models + "/tiny-dino", withDestinationPath: pipelineFixtures.appendingPathComponent("models/tiny-dino").path)
        try writeMobileCLIPFolder(to: models + "/tiny-mobileclip")
        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        _ = try startDaemon("pipe-mc", settings: ["pipeline": "nola", "model_root": models, "clip_model": "tiny-mobileclip",
                                                   "dino_model": "tiny-dino", "threads": "2"])
        func run(_ parameters: String) throws -> Int64 {
            let rows = try db.query("""
                INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, $2, $3::jsonb) RETURNING id
                """, [collection, PipelineTests.classes, parameters])
            let id = Int64(try rows[0].int("id"))
            let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 180)
            let error = try row.optionalString("error") ?? ""
            XCTAssertEqual(try row.string("state"), "succeeded", error)
            return id
        }
        let tuned = try run(#"{"prompt_epochs": 2, "prompt_batch_size": 8, "prompt_count": 4, "alignment_epochs": 3, "min_k": 2, "seed": 5}"#)
        let images = try db.query("SELECT count(*) AS n FROM nola.images WHERE job_id = $1", [tuned])
        let labelled = try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1 AND label IS NOT NULL", [tuned])
        XCTAssertGreaterThan(try images[0].int("n"), 0)
        // every image but red_ball/bad.jpg (not an image) labelled
        XCTAssertEqual(try labelled[0].int("n"), try images[0].int("n") - 1, "every readable image labelled")
        // the tuned state: 4 prompts of the ViT's width 64, the trunk's LayerNorms under their checkpoint names
        let prompts = try db.query("SELECT backbone::text AS b, octet_length(safetensors) AS bytes FROM nola.prompts WHERE job_id = $1", [tuned])
        XCTAssertTrue(try prompts[0].string("b").contains("tiny-mobileclip"))
        let blob = try db.query("SELECT safetensors FROM nola.prompts WHERE job_id = $1", [tuned])
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("mobileclip-prompts-\(UUID().uuidString).safetensors")
        try Data(try blob[0].bytes("safetensors")).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let tensors = try SafeTensorsFile(url: file)
        XCTAssertEqual(tensors.shape(of: "prompt_embeddings"), [4, 64])
        XCTAssertEqual(tensors.shape(of: "visual.trunk.blocks.1.norm2.weight"), [64])
        XCTAssertEqual(tensors.shape(of: "visual.trunk.norm.bias"), [64])
        // inference only: the tuned prompts label the collection again, the same way
        let again = try run(#"{"prompts_from_job": \#(tuned)}"#)
        let same = try db.query("""
            SELECT count(*) AS n FROM nola.labels a JOIN nola.labels b USING (path)
            WHERE a.job_id = $1 AND b.job_id = $2 AND a.label = b.label
            """, [tuned, again])
        XCTAssertEqual(try same[0].int("n"), try labelled[0].int("n"), "the inference-only job labels as the tuning job did")
    }
}
