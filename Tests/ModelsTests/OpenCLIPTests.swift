// open_clip's hub layout and MetaCLIP's transformers layout against their own libraries, on the tiny
// random-weight fixtures written by reference/make_open_clip_fixtures.py (open_clip 3.3, transformers 5.24).
// Tolerance as for CLIP: max abs error ≤ 1e-4 × the output's max magnitude; each comparison prints its error.
import Foundation
import Kernels
import XCTest
@testable import Models

final class OpenCLIPTests: XCTestCase {
    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    /// Both weight files (safetensors, torch.save), QuickGELU and GELU, and MetaCLIP's config (GELU, the
    /// legacy eos_token_id 2: pooled at the highest id), image and text, against open_clip / transformers.
    func testImageAndTextFeatures_matchOpenCLIPAndTransformers() throws {
        let f = try io("openclip_io.safetensors")
        let pixels = try f.floats("pixel_values")
        let ids = try f.floats("input_ids").map { Int32($0) }
        let rows = (0..<3).map { Array(ids[($0 * 16)..<(($0 + 1) * 16)]) }
        for name in ["openclip-quickgelu", "openclip-gelu", "metaclip"] {
            let folder = fixtures.appendingPathComponent(name)
            XCTAssertEqual(try modelType(folder: folder), "clip")
            let model = try CLIPModel(folder: folder)
            XCTAssertEqual(model.config.visionConfig.hiddenAct, name == "openclip-quickgelu" ? .quickGelu : .gelu, name)
            XCTAssertEqual(rows.map { model.poolingPosition($0) }, [4, 8, 15], "\(name): pooled at the end token")
            compare("\(name) image features", model.getImageFeatures(pixels: pixels, batch: 2), try f.floats(name + ".image_features"), relTol: 1e-4)
            compare("\(name) text features", model.getTextFeatures(rows), try f.floats(name + ".text_features"), relTol: 1e-4)
        }
        XCTAssertTrue(OpenCLIPFolder.isOpenCLIP(fixtures.appendingPathComponent("openclip-gelu")))
        XCTAssertFalse(OpenCLIPFolder.isOpenCLIP(fixtures.appendingPathComponent("metaclip")))
        XCTAssertEqual(weightsFile(folder: fixtures.appendingPathComponent("openclip-gelu"))?.lastPathComponent, "open_clip_pytorch_model.bin")
    }

    /// A copy of the quickgelu folder with its config edited; the load must fail with `reason`.
    private func refusal(_ edit: (inout [String: Any]) -> Void, weights: Bool = true) throws -> String {
        let source = fixtures.appendingPathComponent("openclip-quickgelu")
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-openclip-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: source.appendingPathComponent(OpenCLIPFolder.configFile))) as! [String: Any]
        var model = config["model_cfg"] as! [String: Any]
        edit(&model)
        config["model_cfg"] = model
        try JSONSerialization.data(withJSONObject: config).write(to: folder.appendingPathComponent(OpenCLIPFolder.configFile))
        if weights {
            try FileManager.default.copyItem(at: source.appendingPathComponent("open_clip_model.safetensors"),
                                             to: folder.appendingPathComponent("open_clip_model.safetensors"))
        }
        do {
            _ = try CLIPModel(folder: folder)
            XCTFail("loaded")
            return ""
        } catch let error as CheckpointError {
            return "\(error)".replacingOccurrences(of: folder.path, with: "DIR")
        }
    }

    func testUnsupportedTowersAndOptions_areRefusedByName() throws {
        func vision(_ key: String, _ value: Any) -> (inout [String: Any]) -> Void {
            { m in var v = m["vision_cfg"] as! [String: Any]; v[key] = value; m["vision_cfg"] = v }
        }
        func text(_ key: String, _ value: Any) -> (inout [String: Any]) -> Void {
            { m in var t = m["text_cfg"] as! [String: Any]; t[key] = value; m["text_cfg"] = t }
        }
        let cases: [(String, (inout [String: Any]) -> Void)] = [
            ("the image tower is a timm model (convnext_base); only open_clip's ViT image tower and MobileCLIP's (fastvit_mci0, fastvit_mci1, fastvit_mci2, vit_base_mci_224) are supported", vision("timm_model_name", "convnext_base")),
            ("the image tower is a ResNet (vision_cfg.layers is a list); only open_clip's ViT image tower is supported", vision("layers", [3, 4, 6, 3])),
            ("the text tower is a Hugging Face model (xlm-roberta-base); only open_clip's standard text transformer is supported", text("hf_model_name", "xlm-roberta-base")),
            ("the tokenizer is timm/ViT-B-16-SigLIP; only CLIP's BPE tokenizer is supported", text("hf_tokenizer_name", "timm/ViT-B-16-SigLIP")),
            ("vision_cfg.ls_init_value 0.1 is not supported (nolad runs open_clip's plain ViT and text transformer; this option must be null)", vision("ls_init_value", 0.1)),
            ("text_cfg.pool_type \"last\" is not supported (nolad runs open_clip's plain ViT and text transformer; this option must be \"argmax\")", text("pool_type", "last")),
            ("vision_cfg.width 64 is not divisible by head_width 24", vision("head_width", 24)),
            ("init_logit_bias (a SigLIP-style sigmoid head) is not supported", { $0["init_logit_bias"] = -10 }),
        ]
        for (reason, edit) in cases {
            XCTAssertEqual(try refusal(edit), "bad model config DIR/open_clip_config.json: \(reason)")
        }
        XCTAssertEqual(try refusal({ _ in }, weights: false),
                       "missing file: DIR/open_clip_model.safetensors or DIR/open_clip_pytorch_model.bin")
        // A config that does not match the weights names the tensor by its open_clip name.
        XCTAssertEqual(try refusal(vision("width", 32)).replacingOccurrences(of: "DIR", with: ""),
                       "tensor 'visual.conv1.weight' has shape [64, 3, 8, 8], expected [32, 3, 8, 8]")
    }
}
