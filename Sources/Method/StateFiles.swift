import Foundation
import Models

// Prompt-tuning state as safetensors bytes (Models' writer/reader), for the daemon to store in
// PostgreSQL: the checkpoint (resume after a crash) and the results blob (what Python loads, and what
// an inference-only job applies to a new collection).

extension PromptTuningState {
    /// The whole training state (learned tensors, AdamW moments, position in metadata) and the teacher's
    /// label of every image (tensor `teacher_labels`, so a resumed job needs neither DINO nor stage 2
    /// again) as safetensors.
    public func checkpointSafeTensors(teacherLabels: [Int]) -> [UInt8] {
        let (tensors, metadata) = checkpoint()
        let teacher = (name: Self.teacherLabelsName, shape: [teacherLabels.count], values: teacherLabels.map(Float.init))
        return writeSafeTensors(tensors: tensors.map { ($0.name, $0.shape, $0.values) } + [teacher], metadata: metadata)
    }

    /// Restores `checkpointSafeTensors(teacherLabels:)` read back from a file.
    public static func restore(checkpointSafeTensors file: SafeTensorsFile) throws -> (state: PromptTuningState, teacherLabels: [Int]) {
        let state = try PromptTuningState(checkpoint: try tensors(file), metadata: file.metadata)
        guard file.shape(of: teacherLabelsName)?.count == 1 else {
            throw MethodError(.badState, teacherLabelsName, "missing")
        }
        let classes = state.head.shape[0]
        let labels = try file.floats(teacherLabelsName).map { v -> Int in
            guard v >= 0, v < Float(classes), v.rounded() == v else {
                throw MethodError(.badState, teacherLabelsName, "\(v) is not a class index below \(classes)")
            }
            return Int(v)
        }
        return (state, labels)
    }

    static let teacherLabelsName = "teacher_labels"

    /// The results blob: `prompt_embeddings` (P, W), every vision LayerNorm (HF names), `head.weight`
    /// (C, E), and `metadata` (the daemon adds the backbone's identity and the parameters JSON) plus
    /// "layer_norms" (their order) and "format".
    public func resultsSafeTensors(metadata: [String: String]) -> [UInt8] {
        var all = metadata
        all["format"] = "nolad-tuned-prompts-1"
        all["layer_norms"] = layerNorms.map(\.name).joined(separator: ",")
        return writeSafeTensors(tensors: learnedTensors().map { ($0.name, $0.shape, $0.values) }, metadata: all)
    }

    /// The learned tensors of a results blob, to label a new collection (inference only; zero moments).
    /// `encoder` checks the shapes against the CLIP the new job loads.
    public init(resultsSafeTensors file: SafeTensorsFile, encoder: PromptTunableEncoder) throws {
        guard file.metadata["format"] == "nolad-tuned-prompts-1" else {
            throw MethodError(.badState, "format", "not a nolad tuned-prompts blob")
        }
        let byName = Dictionary(try Self.tensors(file).map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        func tensor(_ name: String, _ shape: [Int]?) throws -> NamedTensor {
            guard let t = byName[name] else { throw MethodError(.badState, name, "missing") }
            if let shape, t.shape != shape { throw MethodError(.badState, name, "shape \(t.shape), this CLIP needs \(shape)") }
            return t
        }
        let expected = encoder.initialLayerNorms()
        let prompts = try tensor(Self.promptsName, nil)
        guard prompts.shape.count == 2, prompts.shape[1] == encoder.hiddenSize else {
            throw MethodError(.badState, Self.promptsName, "shape \(prompts.shape), this CLIP needs (P, \(encoder.hiddenSize))")
        }
        let head = try tensor(Self.headName, nil)
        guard head.shape.count == 2, head.shape[1] == encoder.featureSize else {
            throw MethodError(.badState, Self.headName, "shape \(head.shape), this CLIP needs (C, \(encoder.featureSize))")
        }
        self.init(prompts: prompts, layerNorms: try expected.map { try tensor($0.name, $0.shape) }, head: head)
    }

    fileprivate static func tensors(_ file: SafeTensorsFile) throws -> [NamedTensor] {
        try file.tensorNames.sorted().map { name in
            NamedTensor(name: name, shape: file.shape(of: name)!, values: try file.floats(name))
        }
    }
}
