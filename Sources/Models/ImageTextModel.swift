import Foundation

/// A CLIP-style image–text model as zero-shot classification, the encode stage and the label stage use it:
/// `CLIPModel` (transformers' or open_clip's ViT) or `MobileCLIPModel`. Features are unnormalised.
public protocol ImageTextModel: AnyObject, Sendable {
    /// Size of both towers' features.
    var projectionDim: Int { get }
    /// The square input side of the image tower.
    var imageSize: Int { get }
    /// The text tower's sizes (context length, vocabulary) the tokenizer must fit.
    var textConfig: CLIPTextConfig { get }
    var logitScale: Float { get }
    /// The per-channel mean and std its pixels are normalised with (CLIP: OpenAI's; MobileCLIP: its preprocess_cfg).
    var imageMean: [Float] { get }
    var imageStd: [Float] { get }
    /// (B, projectionDim) for pixels (B,3,S,S), S = imageSize.
    func getImageFeatures(pixels: UnsafePointer<Float>, batch: Int) -> [Float]
    /// (N, projectionDim) for N id sequences (start … end, padding optional).
    func getTextFeatures(_ sequences: [[Int32]]) -> [Float]
}

extension ImageTextModel {
    public func getImageFeatures(pixels: [Float], batch b: Int) -> [Float] {
        precondition(pixels.count == b * 3 * imageSize * imageSize, "pixels must be (B,3,S,S)")
        return pixels.withUnsafeBufferPointer { getImageFeatures(pixels: $0.baseAddress!, batch: b) }
    }
}

extension CLIPModel: ImageTextModel {
    public var imageSize: Int { config.visionConfig.imageSize }
    public var textConfig: CLIPTextConfig { config.textConfig }
    public var imageMean: [Float] { OpenCLIPPreprocess.openAIMean }
    public var imageStd: [Float] { OpenCLIPPreprocess.openAIStd }
}

extension MobileCLIPModel: ImageTextModel {
    public var textConfig: CLIPTextConfig { config.textConfig }
    public var imageMean: [Float] { config.preprocess.mean }
    public var imageStd: [Float] { config.preprocess.std }
}

/// The image–text model of a folder: a MobileCLIP open_clip folder as `MobileCLIPModel`, any other CLIP
/// folder (transformers' config.json or open_clip's ViT) as `CLIPModel`.
public func loadImageTextModel(folder: URL) throws -> any ImageTextModel {
    if OpenCLIPFolder.mobileCLIPTower(folder) != nil { return try MobileCLIPModel(folder: folder) }
    return try CLIPModel(folder: folder)
}
