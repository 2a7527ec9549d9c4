import Foundation

// Stage 4: labels of every image from the tuned head, beside the zero-shot labels; and the accuracy
// of any stage against folder labels when the collection is laid out one sub-folder per class.

/// label = argmax of head (C, E) on prompted CLIP features (N, E) of the weak view; confidence = its
/// softmax probability (reference `eval_clip`). Ties go to the lower class.
public func labelImages(features: [Float], head: [Float], classCount c: Int) -> (labels: [Int], confidences: [Float]) {
    let (labels, values) = argmaxRows(labelProbabilities(features: features, head: head, classCount: c), columns: c)
    return (labels, values)
}

/// (N, C) softmax probabilities of head (C, E) on prompted CLIP features (N, E).
public func labelProbabilities(features: [Float], head: [Float], classCount c: Int) -> [Float] {
    precondition(c > 0 && head.count % c == 0)
    let e = head.count / c
    precondition(features.count % e == 0)
    let n = features.count / e
    var logits = linear(features, head, nil, n: n, inFeatures: e, outFeatures: c)
    for i in 0..<n {
        var row = Array(logits[(i * c)..<((i + 1) * c)])
        softmaxRow(&row)
        logits.replaceSubrange((i * c)..<((i + 1) * c), with: row)
    }
    return logits
}

/// What one image's label rests on (docs/labels.md): the final model's best classes, the margin between
/// the first two, and whether the zero-shot classifier and the teacher name the same class.
public struct LabelSignals: Equatable, Sendable {
    /// Class indices, most probable first (ties: lower class first, as `argmaxRows`), and their probabilities.
    public var top: [Int]
    public var probabilities: [Float]
    /// probabilities[0] - probabilities[1]; 1 − 0 with a single class.
    public var margin: Float
    public var teacher: Int?
    /// top[0] == zero-shot, and == teacher when there is one.
    public var agreement: Bool

    public var label: Int { top[0] }
    public var confidence: Float { probabilities[0] }

    /// From one row of (C) probabilities; `count` best classes are kept (at most C).
    public init(probabilities row: ArraySlice<Float>, count: Int, zeroShot: Int, teacher: Int?) {
        precondition(!row.isEmpty && count > 0)
        let values = Array(row)
        let order = values.indices.sorted { values[$0] != values[$1] ? values[$0] > values[$1] : $0 < $1 }
        top = Array(order.prefix(count))
        probabilities = top.map { min(1, max(0, values[$0])) }
        margin = min(1, max(0, probabilities[0] - (order.count > 1 ? min(1, max(0, values[order[1]])) : 0)))
        self.teacher = teacher
        let first = order[0]
        agreement = first == zeroShot && (teacher.map { $0 == first } ?? true)
    }
}

/// The job's abstention parameters: an image whose final confidence or margin is below its bound, or
/// (when agreement is required) whose three opinions differ, gets no class, only the reason.
public struct AbstentionRule: Equatable, Sendable {
    public var confidenceBelow: Double
    public var marginBelow: Double
    public var unlessAgree: Bool

    public init(confidenceBelow: Double = 0, marginBelow: Double = 0, unlessAgree: Bool = false) {
        self.confidenceBelow = confidenceBelow
        self.marginBelow = marginBelow
        self.unlessAgree = unlessAgree
    }

    public init(_ p: NolaParameters) {
        self.init(confidenceBelow: p.abstainBelow, marginBelow: p.abstainMarginBelow, unlessAgree: p.abstainUnlessAgree)
    }

    public var isActive: Bool { confidenceBelow > 0 || marginBelow > 0 || unlessAgree }

    /// Which rule an abstention broke, for counting.
    public enum Reason: String, CaseIterable, Sendable { case confidence, margin, disagreement }

    /// The reasons (empty: the image keeps its label) and their sentence, e.g.
    /// "confidence 0.31 below 0.4; margin 0.02 below 0.05". `names` are the class names.
    public func judge(_ s: LabelSignals, zeroShot: Int, names: [String]) -> (reasons: [Reason], text: String)? {
        var reasons: [Reason] = [], words: [String] = []
        if Double(s.confidence) < confidenceBelow {
            reasons.append(.confidence)
            words.append("confidence \(Self.below(Double(s.confidence), confidenceBelow)) below \(Self.text(confidenceBelow))")
        }
        if Double(s.margin) < marginBelow {
            reasons.append(.margin)
            words.append("margin \(Self.below(Double(s.margin), marginBelow)) below \(Self.text(marginBelow))")
        }
        if unlessAgree && !s.agreement {
            reasons.append(.disagreement)
            var who = ["final \(names[s.label])", "zero-shot \(names[zeroShot])"]
            if let t = s.teacher { who.append("teacher \(names[t])") }
            words.append("no agreement: " + who.joined(separator: ", "))
        }
        return reasons.isEmpty ? nil : (reasons, words.joined(separator: "; "))
    }

    /// `x` with the fewest decimals (2 to 9) that still show it below `bound`.
    static func below(_ x: Double, _ bound: Double) -> String {
        for d in 2...9 {
            let s = String(format: "%.\(d)f", x)
            if let v = Double(s), v < bound { return s }
        }
        return String(x)
    }

    static func text(_ x: Double) -> String { String(x) }
}

/// The class of each image from its folder when the collection is one sub-folder per class name:
/// `relativePaths` are relative to the collection root ("cat/001.jpg"); the first component must equal a
/// class name (or equal it with underscores for spaces). Returns nil unless every image is in a class
/// folder (then the layout is not a labelled one and no accuracy is reported).
public func folderLabels(relativePaths: [String], classes: [String]) -> [Int]? {
    var index: [String: Int] = [:]
    for (i, name) in classes.enumerated() {
        index[name] = i
        let underscored = name.replacingOccurrences(of: " ", with: "_")
        if index[underscored] == nil { index[underscored] = i }
    }
    var labels: [Int] = []
    for path in relativePaths {
        let components = path.split(separator: "/", omittingEmptySubsequences: true)
        guard components.count >= 2, let label = index[String(components[0])] else { return nil }
        labels.append(label)
    }
    return labels.isEmpty ? nil : labels
}

/// Fraction of `predicted` equal to `truth` (same length, non-empty).
public func accuracy(predicted: [Int], truth: [Int]) -> Double {
    precondition(predicted.count == truth.count && !truth.isEmpty)
    return Double(zip(predicted, truth).filter { $0 == $1 }.count) / Double(truth.count)
}
