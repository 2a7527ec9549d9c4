import Foundation
import Kernels
import Models

// Adapters from the Models layer's networks to what the method needs. The Models layer's prompt-tuning
// step owns a head and a loss on its logits; the method keeps the head itself (it is initialised from the
// class vectors, checkpointed and exported with the prompts), so the adapter gives the model an identity
// head (projection_dim × projection_dim): its "logits" are then exactly the projected features, and
// ∂loss/∂logits is ∂loss/∂features. The extra (B, E)·(E, E) product costs well under 1 % of a ViT-B/32 step.

/// CLIP's vision tower as a `PromptTunableEncoder`: features = visual_projection(post_layernorm(CLS)),
/// not L2-normalised, as the reference's `cde_adapter` reads them.
public final class CLIPPromptEncoder: PromptTunableEncoder {
    public let model: CLIPModel
    let tuning: CLIPPromptTuning
    /// `tuning.parameters` indices of the LayerNorm tensors, in `initialLayerNorms()` order.
    let normIndices: [Int]

    public init(model: CLIPModel, promptCount: Int) {
        self.model = model
        let w = model.config.visionConfig.hiddenSize, e = model.projectionDim
        var identity = [Float](repeating: 0, count: e * e)
        for i in 0..<e { identity[i * e + i] = 1 }
        let tuning = CLIPPromptTuning(model: model, prompts: [Float](repeating: 0, count: promptCount * w), promptCount: promptCount,
                                      head: identity, classCount: e, normalizesFeatures: false)
        self.tuning = tuning
        let parameters = tuning.parameters
        normIndices = parameters.indices.filter { !["prompts", "head.weight"].contains(parameters[$0].name) }
    }

    public var hiddenSize: Int { model.config.visionConfig.hiddenSize }
    public var featureSize: Int { model.projectionDim }

    /// Activations kept per image for the backward (a slight over-estimate): per layer the input, two
    /// LayerNorm outputs, q/k/v, attention output (8·T·D), the MLP's two (T·I) and the attention
    /// probabilities (heads·T²); plus the same again as backward scratch for one layer.
    public var trainingBytesPerImage: Int {
        let c = model.config.visionConfig
        let t = 1 + c.gridSize * c.gridSize + tuning.promptCount
        let perLayer = 8 * t * c.hiddenSize + 2 * t * c.intermediateSize + c.numAttentionHeads * t * t
        return 4 * perLayer * (c.numHiddenLayers + 2)
    }

    public func initialLayerNorms() -> [NamedTensor] {
        let p = tuning.parameters
        return normIndices.map { NamedTensor(name: p[$0].name, shape: [p[$0].value.count], values: p[$0].value.array) }
    }

    private func load(prompts: [Float], layerNorms: [NamedTensor]) {
        let p = tuning.parameters
        precondition(prompts.count == tuning.prompts.count && layerNorms.count == normIndices.count)
        tuning.prompts.data.update(from: prompts, count: prompts.count)
        for (tensor, i) in zip(layerNorms, normIndices) {
            precondition(tensor.name == p[i].name && tensor.values.count == p[i].value.count, "LayerNorm \(tensor.name) does not fit \(p[i].name)")
            p[i].value.data.update(from: tensor.values, count: tensor.values.count)
        }
    }

    public func trainingStep(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor],
                             lossGradient: ([Float]) -> [Float], promptGradient: inout [Float], layerNormGradients: inout [[Float]]) throws {
        let c = model.config.visionConfig, e = featureSize
        precondition(pixels.count == b * c.numChannels * c.imageSize * c.imageSize, "pixels must be (B,3,S,S)")
        load(prompts: prompts, layerNorms: layerNorms)
        tuning.zeroGrads()
        _ = pixels.withUnsafeBufferPointer { px in
            model.promptTuningStep(tuning, pixels: px.baseAddress!, batch: b) { logits, dLogits in
                let dFeatures = lossGradient(Array(UnsafeBufferPointer(start: logits, count: b * e)))
                precondition(dFeatures.count == b * e)
                dLogits.update(from: dFeatures, count: b * e)
                return 0
            }
        }
        let p = tuning.parameters
        let g = p[p.firstIndex { $0.name == "prompts" }!].grad
        for j in 0..<promptGradient.count { promptGradient[j] += g.data[j] }
        for (k, i) in normIndices.enumerated() {
            let grad = p[i].grad
            for j in 0..<layerNormGradients[k].count { layerNormGradients[k][j] += grad.data[j] }
        }
    }

    public func features(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor]) throws -> [Float] {
        let c = model.config.visionConfig
        precondition(pixels.count == b * c.numChannels * c.imageSize * c.imageSize, "pixels must be (B,3,S,S)")
        load(prompts: prompts, layerNorms: layerNorms)
        return pixels.withUnsafeBufferPointer { model.promptTunedLogits(tuning, pixels: $0.baseAddress!, batch: b).features }
    }
}

/// MobileCLIP-B's ViT tower as a `PromptTunableEncoder`: features = head(norm(blocks([CLS; prompts; patches]))[:, 0]),
/// prompts after CLS before the first block (the trunk has no pre-norm); trained with every LayerNorm of the
/// trunk ("visual.trunk.blocks.i.norm1", …, "visual.trunk.norm").
public final class MobileCLIPViTPromptEncoder: PromptTunableEncoder {
    public let tower: MobileCLIPViT
    let tuning: MobileCLIPViTPromptTuning
    let normIndices: [Int]

    public init(tower: MobileCLIPViT, promptCount: Int) {
        self.tower = tower
        let w = tower.hiddenSize, e = tower.projectionDim
        var identity = [Float](repeating: 0, count: e * e)
        for i in 0..<e { identity[i * e + i] = 1 }
        let tuning = MobileCLIPViTPromptTuning(tower: tower, prompts: [Float](repeating: 0, count: promptCount * w), promptCount: promptCount,
                                               head: identity, classCount: e, normalizesFeatures: false)
        self.tuning = tuning
        let parameters = tuning.parameters
        normIndices = parameters.indices.filter { !["prompts", "head.weight"].contains(parameters[$0].name) }
    }

    public var hiddenSize: Int { tower.hiddenSize }
    public var featureSize: Int { tower.projectionDim }

    /// As CLIP's: per block the input, two LayerNorm outputs, q/k/v, attention output (8·T·D), the MLP's
    /// two (T·I) and the attention probabilities; plus one block of backward scratch and the stem's activations.
    public var trainingBytesPerImage: Int {
        let t = 1 + tower.numPatches + tuning.promptCount, d = tower.hiddenSize
        let perLayer = 8 * t * d + 2 * t * tower.intermediateSize + tower.numHeads * t * t
        return 4 * (perLayer * (tower.depth + 2) + tower.stemFloatsPerImage)
    }

    public func initialLayerNorms() -> [NamedTensor] {
        let p = tuning.parameters
        return normIndices.map { NamedTensor(name: p[$0].name, shape: [p[$0].value.count], values: p[$0].value.array) }
    }

    private func load(prompts: [Float], layerNorms: [NamedTensor]) {
        let p = tuning.parameters
        precondition(prompts.count == tuning.prompts.count && layerNorms.count == normIndices.count)
        tuning.prompts.data.update(from: prompts, count: prompts.count)
        for (tensor, i) in zip(layerNorms, normIndices) {
            precondition(tensor.name == p[i].name && tensor.values.count == p[i].value.count, "LayerNorm \(tensor.name) does not fit \(p[i].name)")
            p[i].value.data.update(from: tensor.values, count: tensor.values.count)
        }
    }

    public func trainingStep(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor],
                             lossGradient: ([Float]) -> [Float], promptGradient: inout [Float], layerNormGradients: inout [[Float]]) throws {
        let s = tower.imageSize, e = featureSize
        precondition(pixels.count == b * 3 * s * s, "pixels must be (B,3,S,S)")
        load(prompts: prompts, layerNorms: layerNorms)
        tuning.zeroGrads()
        _ = pixels.withUnsafeBufferPointer { px in
            tower.promptTuningStep(tuning, pixels: px.baseAddress!, batch: b) { logits, dLogits in
                let dFeatures = lossGradient(Array(UnsafeBufferPointer(start: logits, count: b * e)))
                precondition(dFeatures.count == b * e)
                dLogits.update(from: dFeatures, count: b * e)
                return 0
            }
        }
        let p = tuning.parameters
        let g = p[p.firstIndex { $0.name == "prompts" }!].grad
        for j in 0..<promptGradient.count { promptGradient[j] += g.data[j] }
        for (k, i) in normIndices.enumerated() {
            let grad = p[i].grad
            for j in 0..<layerNormGradients[k].count { layerNormGradients[k][j] += grad.data[j] }
        }
    }

    public func features(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor]) throws -> [Float] {
        let s = tower.imageSize
        precondition(pixels.count == b * 3 * s * s, "pixels must be (B,3,S,S)")
        load(prompts: prompts, layerNorms: layerNorms)
        return pixels.withUnsafeBufferPointer { tower.promptTunedLogits(tuning, pixels: $0.baseAddress!, batch: b).features }
    }
}

/// The prompt-tuning encoder of an image–text model and the number of prompt tokens it trains: `promptCount`
/// for ViT towers (CLIP, MobileCLIP-B), 0 for an MCi tower (MobileCLIP S0/S1/S2: no CLS token to put them after).
public func promptTunableEncoder(_ model: any ImageTextModel, promptCount: Int) -> (encoder: PromptTunableEncoder, promptCount: Int) {
    if let clip = model as? CLIPModel { return (CLIPPromptEncoder(model: clip, promptCount: promptCount), promptCount) }
    guard let mobile = model as? MobileCLIPModel else { preconditionFailure("no prompt-tuning encoder for \(type(of: model))") }
    switch mobile.imageTower {
    case .vit(let tower): return (MobileCLIPViTPromptEncoder(tower: tower, promptCount: promptCount), promptCount)
    case .mci(let m): return (MCiPromptEncoder(model: m), 0)
    }
}
