import Foundation
import Kernels

/// The MobileCLIP image towers open_clip builds through timm (`vision_cfg.timm_model_name`).
public enum MobileCLIPTowerKind: Sendable, Equatable {
    /// MobileCLIP S0/S1/S2 (and MobileCLIP2-S0/S2): timm `fastvit_mci0/1/2`, a conv/attention hybrid.
    case mci(Int)
    /// MobileCLIP-B (and MobileCLIP2-B): timm `vit_base_mci_224`, a convolutional stem and a ViT-B.
    case vitBase

    public init?(timmModelName name: String) {
        switch name {
        case "fastvit_mci0": self = .mci(0)
        case "fastvit_mci1": self = .mci(1)
        case "fastvit_mci2": self = .mci(2)
        case "vit_base_mci_224": self = .vitBase
        default: return nil
        }
    }

    public var timmModelName: String {
        switch self {
        case .mci(let n): return "fastvit_mci\(n)"
        case .vitBase: return "vit_base_mci_224"
        }
    }

    /// The names nolad loads, for messages.
    public static let names = "fastvit_mci0, fastvit_mci1, fastvit_mci2, vit_base_mci_224"

    /// open_clip's `timm_pool` for the tower (the trunk's own pooling before its head).
    var pool: String {
        switch self {
        case .mci: return "avg"
        case .vitBase: return "token"
        }
    }
}

/// open_clip's `preprocess_cfg` for a MobileCLIP model: resize of the shorter side to `image_size` with
/// `interpolation`, centre crop, (x − mean) / std. MobileCLIP: mean 0, std 1, bilinear; MobileCLIP2: OpenAI's
/// mean and std, bilinear.
public struct OpenCLIPPreprocess: Sendable, Equatable {
    public enum Interpolation: String, Sendable { case bilinear, bicubic }
    public var mean: [Float]
    public var std: [Float]
    public var interpolation: Interpolation

    public static let openAIMean: [Float] = [0.48145466, 0.4578275, 0.40821073]
    public static let openAIStd: [Float] = [0.26862954, 0.26130258, 0.27577711]
}

/// A MobileCLIP open_clip folder's `open_clip_config.json`.
public struct MobileCLIPConfig: Sendable {
    public var tower: MobileCLIPTowerKind
    /// vision_cfg.image_size: the square input side (224 for B, 256 for S0/S1/S2).
    public var imageSize: Int
    /// embed_dim: the size of both towers' features.
    public var projectionDim: Int
    public var textConfig: CLIPTextConfig
    public var preprocess: OpenCLIPPreprocess
    /// custom_text: the text tower's keys are under `text.`.
    public var customText: Bool

    /// MobileCLIP-B's sizes with MobileCLIP's preprocessing (benchmarks build random models from it).
    public static func mobileCLIPB() -> MobileCLIPConfig {
        var text = CLIPTextConfig()
        text.hiddenAct = .gelu
        text.pooling = .highestID
        return MobileCLIPConfig(tower: .vitBase, imageSize: 224, projectionDim: 512, textConfig: text,
                                preprocess: OpenCLIPPreprocess(mean: [0, 0, 0], std: [1, 1, 1], interpolation: .bilinear), customText: true)
    }
}

extension OpenCLIPFolder {
    /// The MobileCLIP tower a folder's config names, nil for any other open_clip folder (or none).
    public static func mobileCLIPTower(_ folder: URL) -> MobileCLIPTowerKind? {
        guard isOpenCLIP(folder), let (_, m, _) = try? sections(folder), let v = try? m.sub("vision_cfg"),
              let name = timmModelName(v) else { return nil }
        return MobileCLIPTowerKind(timmModelName: name)
    }

    /// Reads a MobileCLIP folder's `open_clip_config.json`; what nolad's forward passes do not have is
    /// refused by name.
    public static func mobileCLIPConfig(_ folder: URL) throws -> MobileCLIPConfig {
        let (top, m, url) = try sections(folder)
        let v = try m.sub("vision_cfg"), t = try m.sub("text_cfg")
        func refuse(_ what: String) -> CheckpointError { .badConfig(file: url.path, reason: what) }
        guard let name = timmModelName(v), let tower = MobileCLIPTowerKind(timmModelName: name) else {
            throw refuse("vision_cfg.timm_model_name is \(timmModelName(v) ?? "absent"), not a MobileCLIP tower (\(MobileCLIPTowerKind.names))")
        }
        try checkTextAndHeads(m, t, file: url.path)
        // open_clip's TimmModel: proj null keeps the trunk's own head as the projection to embed_dim.
        try refuseOptions(v, section: "vision_cfg", [("timm_pool", tower.pool), ("timm_proj", NSNull()),
                                                     ("timm_model_pretrained", false), ("patch_dropout", 0)], file: url.path)
        let act: Activation = try bool(m, "quick_gelu", file: url.path) ? .quickGelu : .gelu
        let imageSize = try imageSide(v, "image_size", tower == .vitBase ? 224 : 256, file: url.path)
        if imageSize < 2 {
            throw refuse("vision_cfg.image_size \(imageSize) is too small: prompt tuning's strong view needs at least 2 pixels a side")
        }
        if case .mci = tower, imageSize % 32 != 0 {
            throw refuse("vision_cfg.image_size \(imageSize) is not a multiple of 32 (the MCi tower halves its grid five times)")
        }
        return MobileCLIPConfig(tower: tower, imageSize: imageSize, projectionDim: try m.int("embed_dim", 512),
                                textConfig: try textConfig(t, activation: act, file: url.path),
                                preprocess: try preprocess(top, file: url.path), customText: try bool(m, "custom_text", file: url.path))
    }

    /// `preprocess_cfg` (open_clip's defaults for absent keys: OpenAI's mean and std, bicubic, shortest);
    /// only a shorter-side resize with centre crop is supported.
    static func preprocess(_ top: ConfigReader, file: String) throws -> OpenCLIPPreprocess {
        let p = try top.sub("preprocess_cfg")
        func triple(_ key: String, _ fallback: [Float]) throws -> [Float] {
            guard let value = p.object[key], !(value is NSNull) else { return fallback }
            if let n = value as? NSNumber { return [Float](repeating: n.floatValue, count: 3) }
            guard let list = value as? [NSNumber], list.count == 3, list.allSatisfy({ $0.doubleValue.isFinite }) else {
                throw CheckpointError.badConfig(file: file, reason: "preprocess_cfg.\(key) \(jsonText(value)) is not a number or a list of 3 numbers")
            }
            return list.map(\.floatValue)
        }
        let mean = try triple("mean", OpenCLIPPreprocess.openAIMean), std = try triple("std", OpenCLIPPreprocess.openAIStd)
        if std.contains(where: { $0 <= 0 }) {
            throw CheckpointError.badConfig(file: file, reason: "preprocess_cfg.std \(std) is not positive: normalising would divide by it")
        }
        var interpolation = OpenCLIPPreprocess.Interpolation.bicubic
        if let value = p.object["interpolation"], !(value is NSNull) {
            guard let s = value as? String, let i = OpenCLIPPreprocess.Interpolation(rawValue: s) else {
                throw CheckpointError.badConfig(file: file, reason: "preprocess_cfg.interpolation \(jsonText(value)) is not supported (only \"bilinear\" or \"bicubic\")")
            }
            interpolation = i
        }
        if let value = p.object["resize_mode"], !(value is NSNull), (value as? String) != "shortest" {
            throw CheckpointError.badConfig(file: file, reason: "preprocess_cfg.resize_mode \(jsonText(value)) is not supported (only \"shortest\")")
        }
        return OpenCLIPPreprocess(mean: mean, std: std, interpolation: interpolation)
    }
}

/// A MobileCLIP model from its open_clip folder: one of MobileCLIP's image towers (`visual.trunk.*`, timm's
/// names) and open_clip's text transformer (`text.*`, read as CLIP's text tower; without the causal mask
/// for S0/S1/S2). Weights are immutable after loading; calls allocate their own activations.
public final class MobileCLIPModel: @unchecked Sendable {
    public enum ImageTower: @unchecked Sendable {
        /// MobileCLIP-B: ConvStem + ViT-B (prompt tuning as on CLIP's ViT).
        case vit(MobileCLIPViT)
        /// S0/S1/S2: an MCi tower (the tuned variant trains the last stage's norms and layer scales).
        case mci(MCiModel)
    }

    public let config: MobileCLIPConfig
    public let imageTower: ImageTower
    let textModel: CLIPTextTransformer
    let textProjection: Linear      // text.text_projection (used as x @ P), as (P, D) without bias
    public let logitScale: Float

    public convenience init(folder: URL) throws {
        let config = try OpenCLIPFolder.mobileCLIPConfig(folder)
        let url = try OpenCLIPFolder.weightsFile(folder)
        let file: TensorSource = url.pathExtension == "safetensors" ? try SafeTensorsFile(url: url) : try TorchCheckpointFile(url: url)
        do {
            try self.init(config: config, weights: OpenCLIPNames(file, visionLayers: nil, textLayers: config.textConfig.numHiddenLayers,
                                                                 textPrefix: config.customText ? "text." : ""))
        } catch CheckpointError.badConfig(let name, let reason) where name == OpenCLIPFolder.configFile {
            // the towers know the sizes, the folder knows the file
            throw CheckpointError.badConfig(file: folder.appendingPathComponent(name).path, reason: reason)
        }
    }

    /// `weights` nil: random weights of the configured sizes (benchmarks). The text tower's tensors are
    /// read under transformers' CLIP names (`OpenCLIPNames`), the image tower's under timm's.
    public init(config: MobileCLIPConfig, weights: TensorSource?) throws {
        self.config = config
        var w = WeightReader(weights)
        var ignored: Set<String> = []
        switch config.tower {
        case .vitBase:
            let vit = try MobileCLIPViT(imageSize: config.imageSize, projectionDim: config.projectionDim, &w, prefix: "visual.trunk.")
            ignored.formUnion(vit.ignoredTensors)
            imageTower = .vit(vit)
        case .mci:
            let name = config.tower.timmModelName
            guard let c = MCiConfig(timmModelName: name, embedDim: config.projectionDim, imageSize: config.imageSize) else {
                preconditionFailure("\(name) is an MCi tower")
            }
            // MCiModel reads the trunk under visual.trunk. itself and refuses tensors there it does not read.
            imageTower = .mci(try MCiModel(config: c, weights: weights, prefix: "visual.trunk."))
            ignored.formUnion((weights?.tensorNames ?? []).filter { $0.hasPrefix("visual.trunk.") })
        }
        textModel = try CLIPTextTransformer(config.textConfig, &w)
        textProjection = try w.linear("text_projection", in: config.textConfig.hiddenSize, out: config.projectionDim, bias: false)
        logitScale = try w.tensor("logit_scale", []).array[0]
        try w.finish(ignoring: ignored)
    }

    public var projectionDim: Int { config.projectionDim }
    public var imageSize: Int { config.imageSize }

    /// open_clip's `encode_image` (unnormalised): (B, embed_dim) for pixels (B,3,S,S), S = image_size.
    public func getImageFeatures(pixels: UnsafePointer<Float>, batch b: Int) -> [Float] {
        switch imageTower {
        case .vit(let v): return v.imageFeatures(pixels: pixels, batch: b)
        case .mci(let m): return m.imageFeatures(pixels: pixels, batch: b)
        }
    }

    /// open_clip's `encode_text` (unnormalised) for each id sequence (start … end, padding optional).
    public func getTextFeatures(_ sequences: [[Int32]]) -> [Float] {
        textTowerFeatures(textModel, projection: textProjection, sequences)
    }

    public func poolingPosition(_ ids: [Int32]) -> Int { config.textConfig.poolingPosition(ids) }
}
