// MobileCLIP-B's ViT tower (timm vit_base_mci_224: ConvStem + ViT) and open_clip's text tower with and without
// its causal mask, against open_clip + timm on the tiny random-weight folders written by
// reference/make_mobileclip_model_fixtures.py (open_clip 3.3, timm 1.0.31).
// Tolerances as for CLIP: features 1e-4 × the output's max magnitude, gradients 1e-3; each prints its error.
import Foundation
import Kernels
import XCTest
@testable import Models

final class MobileCLIPTests: XCTestCase {
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    func testMobileCLIPB_imageAndTextFeatures_causalAndBidirectionalText_matchOpenCLIP() throws {
        let f = try io("mobileclip_io.safetensors")
        let pixels = try f.floats("pixel_values")
        let ids = try f.floats("input_ids").map { Int32($0) }
        let rows = (0..<3).map { Array(ids[($0 * 16)..<(($0 + 1) * 16)]) }
        for (name, causal, depth) in [("mobileclip-vit", true, 2), ("mobileclip-vit-bidir", false, 1)] {
            let folder = fixtures.appendingPathComponent(name)
            XCTAssertEqual(OpenCLIPFolder.mobileCLIPTower(folder), .vitBase)
            let model = try MobileCLIPModel(folder: folder)
            XCTAssertEqual(model.config.textConfig.causal, causal, name)
            XCTAssertEqual(model.config.preprocess, OpenCLIPPreprocess(mean: [0, 0, 0], std: [1, 1, 1], interpolation: .bilinear))
            guard case .vit(let tower) = model.imageTower else { return XCTFail("not the ViT tower") }
            XCTAssertEqual([tower.hiddenSize, tower.numHeads, tower.gridSize, tower.blocks.count], [64, 1, 2, depth], name)
            XCTAssertEqual(rows.map { model.poolingPosition($0) }, [4, 8, 15], name)
            compare("\(name) image features", model.getImageFeatures(pixels: pixels, batch: 2), try f.floats(name + ".image_features"), relTol: 1e-4)
            compare("\(name) text features", model.getTextFeatures(rows), try f.floats(name + ".text_features"), relTol: 1e-4)
            // unpadded sequences give the same: without the causal mask nolad pads with 0 as open_clip's tokenizer does
            let unpadded = rows.map { Array($0.prefix(model.poolingPosition($0) + 1)) }
            compare("\(name) text features, unpadded", model.getTextFeatures(unpadded), try f.floats(name + ".text_features"), relTol: 1e-4)
        }
    }

    func testMobileCLIPBPromptTuning_gradientsOfPromptsLayerNormsAndHead_matchTorchAutograd() throws {
        let model = try MobileCLIPModel(folder: fixtures.appendingPathComponent("mobileclip-vit"))
        guard case .vit(let tower) = model.imageTower else { return XCTFail("not the ViT tower") }
        let f = try io("mobileclip_io.safetensors")
        let pixels = try f.floats("pixel_values"), image = 3 * 32 * 32
        let labels = try f.floats("labels").map { Int($0) }
        let state = MobileCLIPViTPromptTuning(tower: tower, prompts: try f.floats("prompts"), promptCount: 4,
                                              head: try f.floats("head"), classCount: 5, normalizesFeatures: true)
        var logitsSeen: [Float] = []
        // two micro-batches of one image accumulate to the gradient of the mean loss over both
        var total: Float = 0
        for bi in 0..<2 {
            let one = Array(pixels[(bi * image)..<((bi + 1) * image)])
            total += one.withUnsafeBufferPointer { px in
                tower.promptTuningStep(state, pixels: px.baseAddress!, batch: 1) { logits, dlogits in
                    logitsSeen += Array(UnsafeBufferPointer(start: logits, count: 5))
                    let l = crossEntropyForwardBackward(dlogits: dlogits, logits, labels: [labels[bi]], n: 1, c: 5, smoothing: 0.1)
                    for j in 0..<5 { dlogits[j] /= 2 }
                    return l / 2
                }
            }
        }
        compare("prompt logits", logitsSeen, try f.floats("prompt_logits"), relTol: 1e-4)
        XCTAssertEqual(total, try f.floats("prompt_loss")[0], accuracy: 1e-4)
        let params = state.parameters
        XCTAssertEqual(params.count, 2 + 2 * (2 * 2 + 1))
        for p in params {
            compare("grad \(p.name)", p.grad.array, try f.floats("grad." + p.name), relTol: 1e-3)
        }
        let (features, logits) = pixels.withUnsafeBufferPointer { tower.promptTunedLogits(state, pixels: $0.baseAddress!, batch: 2) }
        compare("prompt features", features, try f.floats("prompt_features"), relTol: 1e-4)
        compare("prompt logits (batched)", logits, try f.floats("prompt_logits"), relTol: 1e-4)
    }

    /// A copy of mobileclip-vit with its config edited; the load (`load`) must fail with `reason`.
    private func refusal(_ edit: (inout [String: Any]) -> Void, load: (URL) throws -> Void = { _ = try MobileCLIPModel(folder: $0) }) throws -> String {
        let source = fixtures.appendingPathComponent("mobileclip-vit")
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-mobileclip-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: source.appendingPathComponent(OpenCLIPFolder.configFile))) as! [String: Any]
        edit(&config)
        try JSONSerialization.data(withJSONObject: config).write(to: folder.appendingPathComponent(OpenCLIPFolder.configFile))
        try FileManager.default.copyItem(at: source.appendingPathComponent("open_clip_model.safetensors"),
                                         to: folder.appendingPathComponent("open_clip_model.safetensors"))
        do {
            try load(folder)
            XCTFail("loaded")
            return ""
        } catch let error as CheckpointError {
            return "\(error)".replacingOccurrences(of: folder.path, with: "DIR")
        }
    }

    func testMobileCLIPFolder_unsupportedOptionsAndMismatches_areRefusedWithASentence() throws {
        func vision(_ key: String, _ value: Any) -> (inout [String: Any]) -> Void {
            { c in var m = c["model_cfg"] as! [String: Any]; var v = m["vision_cfg"] as! [String: Any]; v[key] = value; m["vision_cfg"] = v; c["model_cfg"] = m }
        }
        func preprocess(_ key: String, _ value: Any) -> (inout [String: Any]) -> Void {
            { c in var p = c["preprocess_cfg"] as! [String: Any]; p[key] = value; c["preprocess_cfg"] = p }
        }
        let prefix = "bad model config DIR/open_clip_config.json: "
        XCTAssertEqual(try refusal(vision("timm_proj", "linear")),
                       prefix + "vision_cfg.timm_proj \"linear\" is not supported (nolad runs open_clip's plain ViT and text transformer; this option must be null)")
        XCTAssertEqual(try refusal(vision("timm_model_name", "convnext_base")),
                       prefix + "vision_cfg.timm_model_name is convnext_base, not a MobileCLIP tower (fastvit_mci0, fastvit_mci1, fastvit_mci2, vit_base_mci_224)")
        XCTAssertEqual(try refusal(preprocess("interpolation", "lanczos")),
                       prefix + "preprocess_cfg.interpolation \"lanczos\" is not supported (only \"bilinear\" or \"bicubic\")")
        XCTAssertEqual(try refusal(preprocess("resize_mode", "squash")),
                       prefix + "preprocess_cfg.resize_mode \"squash\" is not supported (only \"shortest\")")
        // the tensors fix the grid: 48 px through the stem's stride 16 is a 3×3 grid, the checkpoint has 2×2
        XCTAssertEqual(try refusal(vision("image_size", 48)), "tensor 'visual.trunk.pos_embed' has shape [1, 4, 64], expected [1, 9, 64]")
        XCTAssertEqual(try refusal(vision("image_size", 40)), prefix + "vision_cfg.image_size 40 is not a multiple of the stem's stride 16")
        // the CLIP loader sends a MobileCLIP folder to the MobileCLIP one
        XCTAssertEqual(try refusal({ _ in }, load: { _ = try CLIPModel(folder: $0) }),
                       prefix + "the image tower is MobileCLIP's vit_base_mci_224, not open_clip's ViT; the folder loads as a MobileCLIP model")
    }
}
