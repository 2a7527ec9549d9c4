// A job whose clip_model is an open_clip folder of a MobileCLIP with an MCi image tower runs every stage
// end to end through `nolad serve`: zero-shot classifier, encode, pseudo-labels, NoLA's third step with the
// MCi tuned variant (the last stage's norms and layer scales with the head), labels; an inference-only job
// reuses the tuned state; a checkpoint without one of the trunk's tensors fails its job with a sentence naming
// the tensor and leaves the daemon running. No MCi checkpoint is small (the tower's config is fixed by its timm
// name), so the test writes a folder laid out as the published ones (apple/MobileCLIP-S2-OpenCLIP,
// timm/MobileCLIP2-S0-OpenCLIP): a full-size fastvit_mci0 trunk in training form (the form open_clip saves) with
// random weights of the real shapes under timm's names, and a tiny text tower read from text_cfg.
import Foundation
import Models
import XCTest

/// Writes an open_clip folder of a MobileCLIP whose image tower is timm's `fastvit_mci0`, in training form,
/// with random weights; the text tower's sizes come from `text_cfg`, as open_clip reads them. The tensor names
/// and shapes are timm's FastVit (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc,
/// AttentionBlock, ConvMlp), written here from timm's model code, not from nolad's loader.
struct MCiFolderWriter {
    /// fastvit_mci0's blocks per stage, widths and mlp_ratios, and open_clip's embed_dim; other sizes only to
    /// compare the layout with timm's tiny fixture.
    var layers = [2, 6, 10, 2], widths = [64, 128, 256, 512], mlpRatios = [3, 3, 3, 3], embedDim = 512
    let imageSize = 256
    /// The tiny text tower (width, heads, layers; the pipeline's tiny CLIP tokenizer: 520 ids, 24 positions).
    let textWidth = 32, textHeads = 4, textLayers = 2, vocabSize = 520, contextLength = 24

    var tensors: [(name: String, shape: [Int], values: [Float])] = []
    var generator = SplitMix64(seed: 0x4D4349_30)
    /// U(0, 1) numbers each tensor reads a run of from a random start (drawing 11 M numbers one by one
    /// in the unoptimised test build would take most of the test's time).
    let pool: [Float] = {
        var g = SplitMix64(seed: 0x706F6F6C)
        return (0..<65_521).map { _ in Float.random(in: 0..<1, using: &g) }
    }()

    mutating func uniform(_ shape: [Int], _ low: Float, _ high: Float) -> [Float] {
        let count = shape.reduce(1, *), start = Int.random(in: 0..<pool.count, using: &generator)
        var out = [Float](repeating: 0, count: count)
        out.withUnsafeMutableBufferPointer { o in
            pool.withUnsafeBufferPointer { p in
                var j = start
                for i in 0..<count {
                    o[i] = low + (high - low) * p[j]
                    j = j + 1 == p.count ? 0 : j + 1
                }
            }
        }
        return out
    }
    /// He-uniform in the fan-in of every dimension but the first (timm's convs and linears keep their scale so).
    mutating func weight(_ name: String, _ shape: [Int]) {
        let bound = (6 / Float(shape.dropFirst().reduce(1, *))).squareRoot()
        tensors.append((name, shape, uniform(shape, -bound, bound)))
    }
    mutating func vector(_ name: String, _ c: Int, _ low: Float, _ high: Float) {
        tensors.append((name, [c], uniform([c], low, high)))
    }
    /// nn.BatchNorm2d with random statistics (every branch visible, variance positive).
    mutating func batchNorm(_ name: String, _ c: Int) {
        vector(name + ".weight", c, 0.5, 1.5)
        vector(name + ".bias", c, -0.1, 0.1)
        vector(name + ".running_mean", c, -0.1, 0.1)
        vector(name + ".running_var", c, 0.5, 1.5)
    }
    /// timm's ConvNormAct without act: `conv` (no bias) and `bn`.
    mutating func convBN(_ name: String, out: Int, inPerGroup: Int, kernel k: Int) {
        weight(name + ".conv.weight", [out, inPerGroup, k, k])
        batchNorm(name + ".bn", out)
    }
    mutating func layerScale(_ name: String, _ c: Int) {
        tensors.append((name + ".gamma", [c, 1, 1], uniform([c], 0.05, 0.2)))
    }
    /// timm's SqueezeExcite of MobileOneBlock / ReparamLargeKernelConv: fc1 and fc2 as 1×1 convs with bias.
    mutating func squeezeExcite(_ name: String, _ c: Int, reduced r: Int) {
        weight(name + ".fc1.weight", [r, c, 1, 1]); vector(name + ".fc1.bias", r, -0.1, 0.1)
        weight(name + ".fc2.weight", [c, r, 1, 1]); vector(name + ".fc2.bias", c, -0.1, 0.1)
    }
    /// MobileOneBlock (num_conv_branches 1) in training form: conv_kxk.0, conv_scale when the kernel is larger
    /// than 1, identity (a BatchNorm) when in = out and stride 1; SE with rd_ratio 1/16.
    mutating func mobileOne(_ name: String, in cin: Int, out: Int, kernel k: Int, stride: Int, depthwise: Bool,
                            se: Bool = false, scaleBranch: Bool = true, convBranches: Int = 1) {
        let ipg = depthwise ? 1 : cin
        for i in 0..<convBranches { convBN("\(name).conv_kxk.\(i)", out: out, inPerGroup: ipg, kernel: k) }
        if k > 1 && scaleBranch { convBN(name + ".conv_scale", out: out, inPerGroup: ipg, kernel: 1) }
        if cin == out && stride == 1 { batchNorm(name + ".identity", out) }
        if se { squeezeExcite(name + ".se", out, reduced: out / 16) }
    }
    /// ConvMlp: a 7×7 depthwise ConvNormAct, fc1, fc2 (1×1 convs with bias).
    mutating func convMlp(_ name: String, _ d: Int, ratio: Int) {
        let hidden = d * ratio
        convBN(name + ".conv", out: d, inPerGroup: 1, kernel: 7)
        weight(name + ".fc1.weight", [hidden, d, 1, 1]); vector(name + ".fc1.bias", hidden, -0.1, 0.1)
        weight(name + ".fc2.weight", [d, hidden, 1, 1]); vector(name + ".fc2.bias", d, -0.1, 0.1)
    }

    /// Every tensor of the trunk under `visual.trunk.`.
    mutating func writeTrunk() {
        let p = "visual.trunk.", w = widths
        mobileOne(p + "stem.0", in: 3, out: w[0], kernel: 3, stride: 2, depthwise: false)
        mobileOne(p + "stem.1", in: w[0], out: w[0], kernel: 3, stride: 2, depthwise: true)
        mobileOne(p + "stem.2", in: w[0], out: w[0], kernel: 1, stride: 1, depthwise: false)
        for (i, count) in layers.enumerated() {
            let s = p + "stages.\(i)", d = w[i]
            if i > 0 {
                // PatchEmbed: a 7×7 stride-2 ReparamLargeKernelConv (groups = input channels) with a 3×3
                // small_conv, SE (rd_ratio 0.25, divisor 8) in the last two stages, then a 1×1 MobileOneBlock.
                convBN(s + ".downsample.proj.0.large_conv", out: d, inPerGroup: 1, kernel: 7)
                convBN(s + ".downsample.proj.0.small_conv", out: d, inPerGroup: 1, kernel: 3)
                if i >= 2 { squeezeExcite(s + ".downsample.proj.0.se", d, reduced: d / 4) }
                mobileOne(s + ".downsample.proj.1", in: d, out: d, kernel: 1, stride: 1, depthwise: false)
            }
            if i == 3 {  // RepConditionalPosEnc (7×7 depthwise with bias) before the attention blocks
                weight(s + ".pos_emb.pos_enc.weight", [d, 1, 7, 7]); vector(s + ".pos_emb.pos_enc.bias", d, -0.1, 0.1)
            }
            for j in 0..<count {
                let b = s + ".blocks.\(j)"
                if i < 3 {  // RepMixerBlock
                    mobileOne(b + ".token_mixer.mixer", in: d, out: d, kernel: 3, stride: 1, depthwise: true)
                    mobileOne(b + ".token_mixer.norm", in: d, out: d, kernel: 3, stride: 1, depthwise: true, scaleBranch: false, convBranches: 0)
                    layerScale(b + ".token_mixer.layer_scale", d)
                    convMlp(b + ".mlp", d, ratio: mlpRatios[i])
                    layerScale(b + ".layer_scale", d)
                } else {  // AttentionBlock: BatchNorm pre-norm, qkv without bias, proj with bias
                    batchNorm(b + ".norm", d)
                    weight(b + ".token_mixer.qkv.weight", [3 * d, d])
                    weight(b + ".token_mixer.proj.weight", [d, d]); vector(b + ".token_mixer.proj.bias", d, -0.1, 0.1)
                    layerScale(b + ".layer_scale_1", d)
                    convMlp(b + ".mlp", d, ratio: mlpRatios[i])
                    layerScale(b + ".layer_scale_2", d)
                }
            }
        }
        // final_conv: a 3×3 depthwise MobileOneBlock widening ×2, with SE; the head is open_clip's projection
        let last = w[3], final = 2 * last
        mobileOne(p + "final_conv", in: last, out: final, kernel: 3, stride: 1, depthwise: true, se: true)
        weight(p + "head.fc.weight", [embedDim, final]); vector(p + "head.fc.bias", embedDim, -0.01, 0.01)
    }

    /// open_clip's TextTransformer under `text.` (custom_text), its projection used as x @ P.
    mutating func writeText() {
        let t = "text.", d = textWidth
        tensors.append((t + "token_embedding.weight", [vocabSize, d], uniform([vocabSize, d], -0.05, 0.05)))
        tensors.append((t + "positional_embedding", [contextLength, d], uniform([contextLength, d], -0.01, 0.01)))
        for i in 0..<textLayers {
            let r = t + "transformer.resblocks.\(i)"
            for ln in ["ln_1", "ln_2"] { vector(r + ".\(ln).weight", d, 0.9, 1.1); vector(r + ".\(ln).bias", d, -0.05, 0.05) }
            weight(r + ".attn.in_proj_weight", [3 * d, d]); vector(r + ".attn.in_proj_bias", 3 * d, -0.05, 0.05)
            weight(r + ".attn.out_proj.weight", [d, d]); vector(r + ".attn.out_proj.bias", d, -0.05, 0.05)
            weight(r + ".mlp.c_fc.weight", [4 * d, d]); vector(r + ".mlp.c_fc.bias", 4 * d, -0.05, 0.05)
            weight(r + ".mlp.c_proj.weight", [d, 4 * d]); vector(r + ".mlp.c_proj.bias", d, -0.05, 0.05)
        }
        vector(t + "ln_final.weight", d, 0.9, 1.1); vector(t + "ln_final.bias", d, -0.05, 0.05)
        weight(t + "text_projection", [d, embedDim])
        tensors.append(("logit_scale", [], [Float(log(1 / 0.07))]))
    }

    /// MobileCLIP's open_clip_config.json (MobileCLIP-S2-OpenCLIP's, with fastvit_mci0 and the tiny text_cfg).
    var config: [String: Any] {
        ["model_cfg": [
            "embed_dim": embedDim,
            "vision_cfg": ["timm_model_name": "fastvit_mci0", "timm_model_pretrained": false, "timm_pool": "avg",
                           "timm_proj": NSNull(), "timm_drop": 0.0, "timm_drop_path": 0.0, "image_size": imageSize] as [String: Any],
            "text_cfg": ["context_length": contextLength, "vocab_size": vocabSize, "width": textWidth, "heads": textHeads,
                         "layers": textLayers, "no_causal_mask": true] as [String: Any],
            "custom_text": true,
        ] as [String: Any],
         "preprocess_cfg": ["mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0], "interpolation": "bilinear", "resize_mode": "shortest"] as [String: Any]]
    }

    /// Every tensor of the checkpoint (trunk, text tower, logit_scale) and the trunk's parameter count.
    static func checkpoint() -> (writer: MCiFolderWriter, trunkParameters: Int) {
        var w = MCiFolderWriter()
        w.writeTrunk()
        let trunk = w.tensors.reduce(0) { $0 + $1.values.count }
        w.writeText()
        return (w, trunk)
    }

    /// Writes the folder: config, open_clip_model.safetensors without the tensors named in `leavingOut`, and
    /// the tokenizer files copied from `tokenizer`.
    func write(to folder: String, tokenizer: URL, leavingOut: Set<String> = []) throws {
        let fm = FileManager.default
        try fm.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys])
            .write(to: URL(fileURLWithPath: folder + "/" + OpenCLIPFolder.configFile))
        let kept = tensors.filter { !leavingOut.contains($0.name) }
        precondition(kept.count == tensors.count - leavingOut.count, "a tensor to leave out is not in the checkpoint")
        try Data(writeSafeTensors(tensors: kept)).write(to: URL(fileURLWithPath: folder + "/open_clip_model.safetensors"))
        for name in ["vocab.json", "merges.txt"] {
            try fm.copyItem(at: tokenizer.appendingPathComponent(name), to: URL(fileURLWithPath: folder + "/" + name))
        }
    }
}

final class MobileCLIPMCiJobTests: DatabaseTestCase {
    /// The writer's layout is timm's: at the sizes of the tiny FastVit that timm saved for the parity tests
    /// (reference/make_mobileclip_fixtures.py: the MCi block kinds, stages of 1, 1, 1, 2 blocks, widths 8 to
    /// 64, mlp_ratios 3, 3, 3, 2, embed_dim 12), it writes exactly that checkpoint's names and shapes (BatchNorm's
    /// num_batches_tracked aside, which nolad ignores).
    func testMCiFolderWriter_layout_isTimmsTrainingForm() throws {
        let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("ModelsTests/Fixtures/mci-train.safetensors")
        let timm = try SafeTensorsFile(url: fixture)
        var w = MCiFolderWriter()
        (w.layers, w.widths, w.mlpRatios, w.embedDim) = ([1, 1, 1, 2], [8, 16, 32, 64], [3, 3, 3, 2], 12)
        w.writeTrunk()
        let written = Dictionary(uniqueKeysWithValues: w.tensors.map { ($0.name, $0.shape) })
        let saved = Dictionary(uniqueKeysWithValues: timm.tensorNames.filter { !$0.hasSuffix(".num_batches_tracked") }.map { ($0, timm.shape(of: $0)!) })
        XCTAssertEqual(Set(written.keys).subtracting(saved.keys).sorted(), [], "written, not in timm's checkpoint")
        XCTAssertEqual(Set(saved.keys).subtracting(written.keys).sorted(), [], "in timm's checkpoint, not written")
        for (name, shape) in written where saved[name] != nil { XCTAssertEqual(shape, saved[name], name) }
    }

    /// The pipeline's tiny DINO (a transformers ViTModel, 2×2 patches of 16 px at 32 px) for the MCi tower's
    /// 256-px weak view: 2×2 patches of 128 px, each kernel tap spread over an 8×8 block (divided by 64), every
    /// other tensor as it is.
    func writeDINO256(to folder: String) throws {
        let source = pipelineFixtures.appendingPathComponent("models/tiny-dino")
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: source.appendingPathComponent("config.json"))) as! [String: Any]
        XCTAssertEqual(config["image_size"] as? Int, 32)
        XCTAssertEqual(config["patch_size"] as? Int, 16)
        config["image_size"] = 256
        config["patch_size"] = 128
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: folder + "/config.json"))
        let file = try SafeTensorsFile(url: source.appendingPathComponent("model.safetensors"))
        let patch = "embeddings.patch_embeddings.projection.weight"
        let tensors = try file.tensorNames.sorted().map { name -> (name: String, shape: [Int], values: [Float]) in
            let shape = file.shape(of: name)!, values = try file.floats(name)
            guard name == patch else { return (name, shape, values) }
            let (o, c) = (shape[0], shape[1])
            var wide = [Float](repeating: 0, count: o * c * 128 * 128)
            for plane in 0..<(o * c) {
                for y in 0..<128 { for x in 0..<128 { wide[(plane * 128 + y) * 128 + x] = values[(plane * 16 + y / 8) * 16 + x / 8] / 64 } }
            }
            return (name, [o, c, 128, 128], wide)
        }
        try Data(writeSafeTensors(tensors: tensors)).write(to: URL(fileURLWithPath: folder + "/model.safetensors"))
    }

    func testJob_withAnMCi0Folder_tunesItsNormsAndLabelsEndToEnd_inferenceOnlyReusesThem_aMissingTrunkTensorFailsTheJob() throws {
        let models = root + "/../models-\(dbname)"
        try FileManager.default.createDirectory(atPath: models, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(atPath: models) }
        try writeDINO256(to: models + "/tiny-dino-256")
        let tokenizer = pipelineFixtures.appendingPathComponent("models/tiny-clip")
        let (checkpoint, trunkParameters) = MCiFolderWriter.checkpoint()
        XCTAssertGreaterThan(trunkParameters, 10_000_000, "a full-size fastvit_mci0 trunk (about 11 M parameters)")
        try checkpoint.write(to: models + "/mci0", tokenizer: tokenizer)
        let missing = "visual.trunk.stages.2.blocks.7.token_mixer.mixer.conv_scale.conv.weight"
        try checkpoint.write(to: models + "/mci0-broken", tokenizer: tokenizer, leavingOut: [missing])
        let collection = root + "/shapes"
        try FileManager.default.copyItem(atPath: pipelineFixtures.appendingPathComponent("collection").path, toPath: collection)
        let daemon = try startDaemon("pipe-mci", settings: ["pipeline": "nola", "model_root": models, "clip_model": "mci0",
                                                             "dino_model": "tiny-dino-256", "threads": "2"])
        func run(_ parameters: String, expect: String = "succeeded") throws -> (id: Int64, error: String) {
            let rows = try db.query("""
                INSERT INTO nola.jobs (collection, classes, parameters) VALUES ($1, $2, $3::jsonb) RETURNING id
                """, [collection, PipelineTests.classes, parameters])
            let id = Int64(try rows[0].int("id"))
            let row = try waitState(id, ["succeeded", "failed", "cancelled"], timeout: 300)
            let error = try row.optionalString("error") ?? ""
            XCTAssertEqual(try row.string("state"), expect, error)
            return (id, error)
        }

        // a checkpoint without one of the trunk's tensors: the job fails with the tensor's name, and the
        // daemon runs on to take the jobs below
        let broken = try run(#"{"clip_model": "mci0-broken"}"#, expect: "failed")
        XCTAssertTrue(broken.error.contains(missing), broken.error)
        XCTAssertTrue(broken.error.contains("mci0-broken"), broken.error)
        XCTAssertTrue(daemon.process.isRunning, "the daemon survives the broken checkpoint")

        // the whole method, prompt tuning kept small: one epoch, a budget of two steps of 8 views
        let tuned = try run(#"{"prompt_epochs": 1, "prompt_batch_size": 8, "prompt_view_budget": 16, "alignment_epochs": 2, "min_k": 2, "seed": 5}"#).id
        let images = try db.query("SELECT count(*) AS n FROM nola.images WHERE job_id = $1", [tuned])
        let labelled = try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1 AND label IS NOT NULL", [tuned])
        XCTAssertGreaterThan(try images[0].int("n"), 0)
        // every image but red_ball/bad.jpg (not an image) labelled, each with one of the job's classes
        XCTAssertEqual(try labelled[0].int("n"), try images[0].int("n") - 1, "every readable image labelled")
        let foreign = try db.query("SELECT count(*) AS n FROM nola.labels WHERE job_id = $1 AND label IS NOT NULL AND label <> ALL($2)",
                                   [tuned, PipelineTests.classes])
        XCTAssertEqual(try foreign[0].int("n"), 0, "labels are the job's classes")
        // the tune stage ran its steps (the budget's two)
        let tuneMetrics = try db.query("""
            SELECT metrics->>'steps' AS steps FROM nola.events
            WHERE job_id = $1 AND kind = 'metrics' AND stage = 'tune'
            """, [tuned])
        XCTAssertEqual(tuneMetrics.count, 1, "one metrics event of the tune stage")
        if tuneMetrics.count == 1 { XCTAssertEqual(try tuneMetrics[0].optionalString("steps"), "2") }

        // the tuned state: no prompt tokens (prompts (0, 512)), per attention block of the last stage its
        // BatchNorm affine and both layer scales (512 each) under their checkpoint names, the method's head
        let blob = try db.query("SELECT backbone::text AS b, safetensors FROM nola.prompts WHERE job_id = $1", [tuned])
        XCTAssertEqual(blob.count, 1, "one tuned state saved")
        guard blob.count == 1 else { return }
        let row = blob[0]
        XCTAssertTrue(try row.string("b").contains("mci0"))
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("mci-prompts-\(UUID().uuidString).safetensors")
        try Data(try row.bytes("safetensors")).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let tensors = try SafeTensorsFile(url: file)
        XCTAssertEqual(tensors.shape(of: "prompt_embeddings"), [0, 512])
        var expected: Set<String> = ["prompt_embeddings", "head.weight"]
        for j in 0..<2 {
            for part in ["norm.weight", "norm.bias", "layer_scale_1.gamma", "layer_scale_2.gamma"] {
                let name = "visual.trunk.stages.3.blocks.\(j).\(part)"
                expected.insert(name)
                XCTAssertEqual(tensors.shape(of: name), [512], name)
            }
        }
        XCTAssertEqual(tensors.shape(of: "head.weight"), [PipelineTests.classes.count, 512])
        XCTAssertEqual(Set(tensors.tensorNames), expected, "the tuned tensors and nothing else")
        // training moved the tuned tensors away from the checkpoint's values
        let original = try SafeTensorsFile(url: URL(fileURLWithPath: models + "/mci0/open_clip_model.safetensors"))
        let name = "visual.trunk.stages.3.blocks.1.norm.weight"
        let moved = zip(try tensors.floats(name), try original.floats(name)).map { abs($0 - $1) }.max() ?? 0
        XCTAssertGreaterThan(moved, 0, "\(name) was trained")

        // inference only: the tuned state labels the collection again, the same way
        let again = try run(#"{"prompts_from_job": \#(tuned)}"#).id
        let same = try db.query("""
            SELECT count(*) AS n FROM nola.labels a JOIN nola.labels b USING (path)
            WHERE a.job_id = $1 AND b.job_id = $2 AND a.label = b.label
            """, [tuned, again])
        XCTAssertEqual(try same[0].int("n"), try labelled[0].int("n"), "the inference-only job labels as the tuning job did")
    }
}
