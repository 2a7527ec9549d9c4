import Foundation
import Models

/// An MCi image tower (MobileCLIP S0/S1/S2) as a `PromptTunableEncoder` for NoLA's third step. It has no
/// prompt tokens (prompts are (0, W), W the last stage's width): what it tunes in their place are the
/// attention stage's normalisation tensors — per block the BatchNorm affine and the two layer scales —
/// which stand where a ViT's LayerNorms stand in the state, checkpoints and results blob, under their
/// checkpoint names (`visual.trunk.stages.3.blocks.0.norm.weight`, …). docs/mobileclip.md says why.
/// features = head.fc(mean(final_conv(stages(stem(x))))), open_clip's encode_image before normalisation.
public final class MCiPromptEncoder: PromptTunableEncoder {
    public let model: MCiModel
    /// The checkpoint's prefix of the trunk ("visual.trunk." in open_clip's layout), prepended to the names.
    public let prefix: String

    public init(model: MCiModel, prefix: String = "visual.trunk.") {
        precondition(model.isTunable, "the last stage of this tower is not an attention stage")
        self.model = model
        self.prefix = prefix
    }

    public var hiddenSize: Int { model.config.embedDims.last! }
    public var featureSize: Int { model.embedDim }
    public var trainingBytesPerImage: Int { model.tuningBytesPerImage }

    public func initialLayerNorms() -> [NamedTensor] {
        zip(model.tunedTensorNames, model.initialTunedTensors()).map { NamedTensor(name: prefix + $0, shape: [$1.count], values: $1) }
    }

    private func tuned(_ prompts: [Float], _ layerNorms: [NamedTensor]) -> [[Float]] {
        precondition(prompts.isEmpty, "an MCi tower takes no prompt tokens")
        let names = model.tunedTensorNames
        precondition(layerNorms.map(\.name) == names.map { prefix + $0 }, "tuned tensors \(layerNorms.map(\.name)) do not fit this tower")
        return layerNorms.map(\.values)
    }

    private func checkPixels(_ pixels: [Float], _ b: Int) {
        let s = model.config.imageSize
        precondition(pixels.count == b * 3 * s * s, "pixels must be (B,3,\(s),\(s))")
    }

    public func trainingStep(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor],
                             lossGradient: ([Float]) -> [Float], promptGradient: inout [Float], layerNormGradients: inout [[Float]]) throws {
        checkPixels(pixels, b)
        let tuned = tuned(prompts, layerNorms)
        pixels.withUnsafeBufferPointer { px in
            model.tuningStep(pixels: px.baseAddress!, batch: b, tuned: tuned, lossGradient: lossGradient, gradients: &layerNormGradients)
        }
    }

    public func features(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor]) throws -> [Float] {
        checkPixels(pixels, b)
        let tuned = tuned(prompts, layerNorms)
        return pixels.withUnsafeBufferPointer { model.tunedFeatures(pixels: $0.baseAddress!, batch: b, tuned: tuned) }
    }
}
