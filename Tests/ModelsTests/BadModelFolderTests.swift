import Foundation
import XCTest
@testable import Models

/// Model folders a submitter can pick with `clip_model` / `dino_model`, each broken one way, written to a
/// temporary folder: every one is refused at load with a sentence naming the file and what is wrong.
/// Before these checks some of them reached a precondition or an integer overflow when the model ran
/// (num_channels 4, a patch size that does not divide the image, sizes whose square overflows) and
/// aborted the whole daemon.
final class BadModelFolderTests: XCTestCase {
    private var scratch: URL!

    override func setUpWithError() throws {
        scratch = FileManager.default.temporaryDirectory.appendingPathComponent("nolad-badmodel-\(getpid())-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: scratch)
    }

    /// A copy of fixture folder `family` named `name`, with its config.json edited.
    private func copy(_ family: String, as name: String, config edit: (inout [String: Any]) -> Void = { _ in }) throws -> URL {
        let folder = scratch.appendingPathComponent(name)
        try FileManager.default.copyItem(at: fixtures.appendingPathComponent(family), to: folder)
        let configURL = folder.appendingPathComponent("config.json")
        var config = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(contentsOf: configURL)) as? [String: Any])
        edit(&config)
        try JSONSerialization.data(withJSONObject: config, options: [.sortedKeys]).write(to: configURL)
        return folder
    }

    /// The sentence of the error `body` throws ("no error" when it returns).
    private func message(_ body: () throws -> Any) -> String {
        do {
            _ = try body()
            return "no error"
        } catch {
            return "\(error)"
        }
    }

    private func edit(_ key: String, _ sub: String?, _ value: Any) -> (inout [String: Any]) -> Void {
        { config in
            guard let sub else { config[key] = value; return }
            var inner = config[sub] as? [String: Any] ?? [:]
            inner[key] = value
            config[sub] = inner
        }
    }

    // MARK: config.json

    func testCLIPConfig_withMissingZeroNegativeOrInconsistentSizes_isRefusedNamingKeyAndValue() throws {
        let limit = ConfigReader.maximumSize
        let cases: [(String, String?, Any, String)] = [
            ("hidden_size", "vision_config", 0, "vision_config.hidden_size is 0, not an integer from 1 to \(limit)"),
            ("num_hidden_layers", "text_config", -2, "text_config.num_hidden_layers is -2, not an integer from 1 to \(limit)"),
            ("patch_size", "vision_config", "8", "vision_config.patch_size is \"8\", not an integer from 1 to \(limit)"),
            ("projection_dim", nil, 2.5, "projection_dim is 2.5, not an integer from 1 to \(limit)"),
            ("vocab_size", "text_config", NSNull(), "text_config.vocab_size is null, not an integer from 1 to \(limit)"),
            // 2^40 / 8 patches a side: the position count (2^37)² overflowed and trapped before any tensor was read.
            ("image_size", "vision_config", 1 << 40, "vision_config.image_size is 1099511627776, not an integer from 1 to \(limit)"),
            ("num_attention_heads", "vision_config", 5, "vision_config.hidden_size 64 not divisible by vision_config.num_attention_heads 5"),
            ("num_attention_heads", "text_config", 7, "text_config.hidden_size 48 not divisible by text_config.num_attention_heads 7"),
            ("patch_size", "vision_config", 64, "vision_config.image_size 32 is not a multiple of vision_config.patch_size 64"),
            ("patch_size", "vision_config", 12, "vision_config.image_size 32 is not a multiple of vision_config.patch_size 12"),
            ("num_channels", "vision_config", 4, "vision_config.num_channels is 4; only RGB images (3 channels) are supported"),
            // A 1-pixel strong view's perspective corners coincide: its solver's precondition.
            ("image_size", "vision_config", 1, "vision_config.image_size 1 is too small: prompt tuning's strong view needs at least 2 pixels a side"),
            ("max_position_embeddings", "text_config", 1, "text_config.max_position_embeddings 1 leaves no room for BOS and EOS (at least 2)"),
            ("layer_norm_eps", "vision_config", "small", "vision_config.layer_norm_eps is \"small\", not a number"),
            ("hidden_act", "text_config", "relu", "text_config.hidden_act \"relu\" is not supported (gelu, quick_gelu)"),
        ]
        for (i, (key, sub, value, reason)) in cases.enumerated() {
            let folder = try copy("clip", as: "clip-\(i)", config: edit(key, sub, value))
            let file = folder.appendingPathComponent("config.json").path
            XCTAssertEqual(message { try CLIPModel(folder: folder) }, "bad model config \(file): \(reason)")
        }
    }

    func testViTConfig_withBadSizes_isRefusedNamingKeyAndValue() throws {
        let limit = ConfigReader.maximumSize
        let cases: [(String, String, Any, String)] = [
            ("dino", "hidden_size", -24, "hidden_size is -24, not an integer from 1 to \(limit)"),
            ("dino", "num_attention_heads", 5, "hidden_size 64 not divisible by num_attention_heads 5"),
            // A ViT takes image_size × image_size only: 32 is no whole number of 12-pixel patches (the
            // forward pass's precondition), nor of 64-pixel ones.
            ("dino", "patch_size", 12, "image_size 32 is not a multiple of patch_size 12"),
            ("dino", "patch_size", 64, "image_size 32 is not a multiple of patch_size 64"),
            ("dino", "num_channels", 1, "num_channels is 1; only RGB images (3 channels) are supported"),
            ("dinov2", "image_size", 10, "image_size 10 is smaller than patch_size 14"),
            // hidden_size · mlp_ratio overflowed and trapped.
            ("dinov2", "mlp_ratio", 1 << 60, "mlp_ratio is 1152921504606846976, not an integer from 1 to \(limit)"),
        ]
        for (i, (family, key, value, reason)) in cases.enumerated() {
            let folder = try copy(family, as: "\(family)-\(i)", config: edit(key, nil, value))
            let file = folder.appendingPathComponent("config.json").path
            XCTAssertEqual(message { try ViTModel(folder: folder) }, "bad model config \(file): \(reason)")
        }
    }

    func testViTModel_acceptsOnlyTheInputSizesItsForwardPassTakes() throws {
        let dino = try ViTModel(folder: fixtures.appendingPathComponent("dino"))
        XCTAssertTrue(dino.accepts(height: 32, width: 32))
        XCTAssertFalse(dino.accepts(height: 48, width: 48))
        XCTAssertEqual(dino.inputSizeRule, "32×32")
        let dinov2 = try ViTModel(folder: fixtures.appendingPathComponent("dinov2"))
        XCTAssertTrue(dinov2.accepts(height: 56, width: 70))
        XCTAssertFalse(dinov2.accepts(height: 32, width: 32))
        XCTAssertFalse(dinov2.accepts(height: 0, width: 14))
        XCTAssertEqual(dinov2.inputSizeRule, "a multiple of 14 on each side")
    }

    // MARK: model.safetensors

    /// The fixture CLIP's float tensors, in name order.
    private func clipTensors() throws -> [(name: String, shape: [Int], values: [Float])] {
        let file = try SafeTensorsFile(url: fixtures.appendingPathComponent("clip/model.safetensors"))
        return try file.tensorNames.sorted().filter { FloatEncoding(safeTensorsDType: file.dtype(of: $0)!) != nil }.map {
            ($0, file.shape(of: $0)!, try file.floats($0))
        }
    }

    /// The u64 little-endian header length a safetensors file starts with.
    private func headerLength(_ bytes: [UInt8]) -> Int {
        (0..<8).reduce(0) { $0 | Int(bytes[$1]) << (8 * $1) }
    }

    func testCLIPWeights_truncatedMisshapenMissingOrWrongDType_areRefusedNamingFileOrTensor() throws {
        let real = [UInt8](try Data(contentsOf: fixtures.appendingPathComponent("clip/model.safetensors")))
        let tensors = try clipTensors()
        let reshaped = "vision_model.encoder.layers.1.mlp.fc1.weight"
        XCTAssertEqual(tensors.first { $0.name == reshaped }?.shape, [128, 64])
        let misshapen = tensors.map { t -> (name: String, shape: [Int], values: [Float]) in
            t.name == reshaped ? (t.name, [64, 128], t.values) : t
        }
        // The stored dtype of logit_scale changed to I32 (also 4 bytes, so the file stays consistent).
        let written = writeSafeTensors(tensors: tensors)
        let header = String(decoding: written[8..<(8 + headerLength(written))], as: UTF8.self)
        let patched = header.replacingOccurrences(of: #""logit_scale":{"dtype":"F32""#, with: #""logit_scale":{"dtype":"I32""#)
        XCTAssertNotEqual(patched, header)
        let wrongDType = Array(written[0..<8]) + Array(patched.utf8) + Array(written[(8 + patched.utf8.count)...])
        // The last tensor in the data (writeSafeTensors keeps the given order) loses its last 4 bytes.
        let last = tensors[tensors.count - 1]
        let dataSize = 4 * tensors.reduce(0) { $0 + $1.values.count }

        let cases: [(String, [UInt8], (String) -> String)] = [
            ("five-bytes", Array(real[0..<5]), { "cannot read \($0): file is 5 bytes, shorter than the 8-byte header length" }),
            ("header-past-end", Array(real[0..<100]),
             { "cannot read \($0): header length \(self.headerLength(real)) runs past the end of the file (100 bytes)" }),
            ("truncated-data", Array(written.dropLast(4)),
             { "cannot read \($0): tensor '\(last.name)' data [\(dataSize - 4 * last.values.count), \(dataSize)) runs past the end of the data (\(dataSize - 4) bytes; file truncated?)" }),
            ("wrong-shape", writeSafeTensors(tensors: misshapen),
             { _ in "tensor '\(reshaped)' has shape [64, 128], expected [128, 64]" }),
            ("missing-tensor", writeSafeTensors(tensors: tensors.filter { $0.name != "logit_scale" }),
             { _ in "checkpoint has no tensor 'logit_scale'" }),
            ("wrong-dtype", wrongDType, { _ in "tensor 'logit_scale' has unsupported dtype I32" }),
        ]
        for (name, bytes, expected) in cases {
            let folder = try copy("clip", as: name)
            let weights = folder.appendingPathComponent("model.safetensors")
            try Data(bytes).write(to: weights)
            XCTAssertEqual(message { try CLIPModel(folder: folder) }, expected(weights.path), name)
        }
        // The unedited rewrite loads: the failures above are the edits'.
        let folder = try copy("clip", as: "rewritten")
        try Data(written).write(to: folder.appendingPathComponent("model.safetensors"))
        XCTAssertEqual(message { try CLIPModel(folder: folder) }, "no error")
    }
}
