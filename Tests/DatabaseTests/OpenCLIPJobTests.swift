// A job whose clip_model is a folder in open_clip's hub layout labels exactly as the same weights in
// transformers' layout: the pipeline's CLIP fixture is rewritten under open_clip's names and config here.
import Foundation
import Models
import XCTest

final class OpenCLIPJobTests: DatabaseTestCase {
    /// `tiny-clip` (transformers' CLIPModel layout) rewritten as open_clip writes it: open_clip_config.json,
    /// open_clip_model.safetensors with open_clip's names (in_proj packing q, k, v; projections as x @ P).
    func writeOpenCLIPCopy(to folder: String) throws {
        let source = pipelineFixtures.appendingPathComponent("models/tiny-clip")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        for name in ["vocab.json", "merges.txt"] {
            try FileManager.default.copyItem(at: source.appendingPathComponent(name), to: URL(fileURLWithPath: folder + "/" + name))
        }
        let config = try CLIPConfig(folder: source)
        let (v, t) = (config.visionConfig, config.textConfig)
        let openCLIPConfig: [String: Any] = ["model_cfg": [
            "embed_dim": config.projectionDim, "quick_gelu": true,
            "vision_cfg": ["image_size": v.imageSize, "layers": v.numHiddenLayers, "width": v.hiddenSize,
                           "head_width": v.hiddenSize / v.numAttentionHeads, "patch_size": v.patchSize,
                           "mlp_ratio": Double(v.intermediateSize) / Double(v.hiddenSize)],
            "text_cfg": ["context_length": t.maxPositionEmbeddings, "vocab_size": t.vocabSize, "width": t.hiddenSize,
                         "heads": t.numAttentionHeads, "layers": t.numHiddenLayers,
                         "mlp_ratio": Double(t.intermediateSize) / Double(t.hiddenSize)],
        ] as [String: Any]]
        try JSONSerialization.data(withJSONObject: openCLIPConfig).write(to: URL(fileURLWithPath: folder + "/open_clip_config.json"))

        let file = try SafeTensorsFile(url: source.appendingPathComponent("model.safetensors"))
        var out: [(name: String, shape: [Int], values: [Float])] = []
        func same(_ hf: String, _ oc: String) throws { out.append((oc, file.shape(of: hf)!, try file.floats(hf))) }
        func transposed(_ hf: String, _ oc: String) throws {
            let s = file.shape(of: hf)!, x = try file.floats(hf)
            var y = [Float](repeating: 0, count: x.count)
            for i in 0..<s[0] { for j in 0..<s[1] { y[j * s[0] + i] = x[i * s[1] + j] } }
            out.append((oc, [s[1], s[0]], y))
        }
        func block(_ hf: String, _ oc: String) throws {
            for (a, b) in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("self_attn.out_proj", "attn.out_proj"),
                           ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")] {
                try same("\(hf).\(a).weight", "\(oc).\(b).weight")
                try same("\(hf).\(a).bias", "\(oc).\(b).bias")
            }
            for part in ["weight", "bias"] {
                let qkv = try ["q_proj", "k_proj", "v_proj"].map { try file.floats("\(hf).self_attn.\($0).\(part)") }
                var shape = file.shape(of: "\(hf).self_attn.q_proj.\(part)")!
                shape[0] *= 3
                out.append(("\(oc).attn.in_proj_\(part)", shape, qkv.flatMap { $0 }))
            }
        }
        try same("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight")
        try same("vision_model.embeddings.class_embedding", "visual.class_embedding")
        try same("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding")
        try same("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight")
        try same("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias")
        for i in 0..<v.numHiddenLayers { try block("vision_model.encoder.layers.\(i)", "visual.transformer.resblocks.\(i)") }
        try same("vision_model.post_layernorm.weight", "visual.ln_post.weight")
        try same("vision_model.post_layernorm.bias", "visual.ln_post.bias")
        try transposed("visual_projection.weight", "visual.proj")
        try same("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
        try same("text_model.embeddings.position_embedding.weight", "positional_embedding")
        for i in 0..<t.numHiddenLayers { try block("text_model.encoder.layers.\(i)", "transformer.resblocks.\(i)") }
        try same("text_model.final_layer_norm.weight", "ln_final.weight")
        try same("text_model.final_layer_norm.bias", "ln_final.bias")
        try transposed("text_projection.weight", "text_projection")
        try same("logit_scale", "logit_scale")
        try Data(writeSafeTensors(tensors: out)).write(to: URL(fileURLWithPath: folder + "/open_clip_model.safetensors"))
    }

    func testJob_withAnOpenCLIPFolder_labelsAsTheTransformersFolderWithTheSameWeights() throws {
        let models = root + "/../models-\(dbname)"
        try FileManager.default.createDirectory(atPath: models, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: models) }
        for name in ["tiny-clip", "tiny-dino"] {
            try FileManager.default.createSymbolicLink(atPath: models + "/" + name, withDestinationPath: pipelineFixtures.appendingPathComponent("models/\(name)").path)
        }
        try writeOpenCLIPCopy(to: models + "/tiny-clip-openclip")
        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        _ = try startDaemon("pipe-oc", settings: ["pipeline": "nola", "model_root": models, "clip_model": "tiny-clip",
                                                   "dino_model": "tiny-dino", "threads": "2"])
        var ids: [Int64] = []
        for clip in ["tiny-clip", "tiny-clip-openclip"] {
            let rows = try db.query("""
                INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, $2, $3::jsonb) RETURNING id
                """, [collection, PipelineTests.classes,
                      #"{"prompt_epochs": 2, "prompt_batch_size": 8, "alignment_epochs": 3, "min_k": 2, "seed": 5, "clip_model": "\#(clip)"}"#])
            let id = Int64(try rows[0].int("id"))
            let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 180)
            let error = try row.optionalString("error") ?? ""
            XCTAssertEqual(try row.string("state"), "succeeded", "\(clip): \(error)")
            ids.append(id)
        }
        let labelled = try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1 AND label IS NOT NULL", [ids[0]])
        let same = try db.query("""
            SELECT count(*) AS n FROM nola.labels a JOIN nola.labels b USING (path)
            WHERE a.job_id = $1 AND b.job_id = $2 AND a.label = b.label AND a.confidence = b.confidence
              AND a.zero_shot_label = b.zero_shot_label AND a.zero_shot_confidence = b.zero_shot_confidence
            """, [ids[0], ids[1]])
        let (n, total) = (try same[0].int("n"), try labelled[0].int("n"))
        print("open_clip job test: \(n) of \(total) labels and confidences identical")
        XCTAssertGreaterThan(total, 0)
        XCTAssertEqual(n, total, "the same weights label the same, bit for bit")
        let backbone = try db.query("SELECT backbone::text AS b FROM nola.prompts WHERE job_id = $1", [ids[1]])
        let identity = try backbone[0].string("b")
        XCTAssertTrue(identity.contains("tiny-clip-openclip"), identity)
    }
}
