import Foundation

// Stage 2a: zero-shot probabilities of every image and the per-class top-k pseudo-label selection.

/// softmax(logitScale · cos(image, class)) for every image (reference `forward_with_text_desc` + softmax).
/// imageFeatures is (N, D) CLIP image features (any norm); classifier is (C, D) with unit rows;
/// logitScale is exp(logit_scale) (100 for released CLIP). Returns (N, C).
public func zeroShotProbabilities(imageFeatures: [Float], classifier: [Float], dimension d: Int, logitScale: Float) throws -> [Float] {
    precondition(d > 0 && imageFeatures.count % d == 0 && classifier.count % d == 0)
    let n = imageFeatures.count / d, c = classifier.count / d
    var probabilities = [Float](repeating: 0, count: n * c)
    var logits = [Float](repeating: 0, count: c)
    for i in 0..<n {
        let row = imageFeatures[(i * d)..<((i + 1) * d)]
        let norm = row.reduce(Float(0)) { $0 + $1 * $1 }.squareRoot()
        guard norm > 0, norm.isFinite else { throw MethodError(.badInput, "image \(i)", "zero or non-finite CLIP features") }
        for k in 0..<c {
            var dot: Float = 0
            for j in 0..<d { dot += row[row.startIndex + j] * classifier[k * d + j] }
            logits[k] = logitScale * dot / norm
        }
        softmaxRow(&logits)
        probabilities.replaceSubrange((i * c)..<((i + 1) * c), with: logits)
    }
    return probabilities
}

/// In-place numerically stable softmax of one row.
func softmaxRow(_ x: inout [Float]) {
    let m = x.max() ?? 0
    var sum: Float = 0
    for i in x.indices { x[i] = exp(x[i] - m); sum += x[i] }
    for i in x.indices { x[i] /= sum }
}

/// Argmax and its value for each row of an (N, C) matrix; ties go to the lower class.
public func argmaxRows(_ matrix: [Float], columns c: Int) -> (labels: [Int], values: [Float]) {
    precondition(c > 0 && matrix.count % c == 0)
    let n = matrix.count / c
    var labels = [Int](repeating: 0, count: n), values = [Float](repeating: 0, count: n)
    for i in 0..<n {
        var best = 0
        for k in 1..<c where matrix[i * c + k] > matrix[i * c + best] { best = k }
        labels[i] = best
        values[i] = matrix[i * c + best]
    }
    return (labels, values)
}

/// The pseudo-labelled images of stage 2, in selection order (class by class).
public struct PseudoLabels: Equatable, Sendable {
    /// Image indices into the job's image list.
    public var indices: [Int]
    /// The class each selected image is labelled with.
    public var labels: [Int]
    /// Zero-shot probability of that class for that image.
    public var confidences: [Float]
    /// For each class, which rank of prediction its images came from: 1 (top-1), 2 or 3 (fallbacks),
    /// 0 when no image has the class even in its top-3 (the class gets no pseudo-labels).
    public var rankUsed: [Int]
    /// Images labelled with each class after duplicates were dropped.
    public var countPerClass: [Int]
}

/// Per-class top-k selection of the reference (`top_k_indices_per_class2`): for each class c in order,
/// the k images whose top-1 prediction is c, most confident first; if there is none, the k images whose
/// 2nd prediction is c (by that probability), else their 3rd. Then duplicates are dropped keeping the
/// first occurrence (an image chosen as a fallback by an earlier class stays with that class).
/// Ties in probability go to the lower image index. probabilities is (N, C).
public func selectPseudoLabels(probabilities: [Float], classCount c: Int, k: Int) -> PseudoLabels {
    precondition(c > 0 && probabilities.count % c == 0 && k > 0)
    let n = probabilities.count / c
    let ranks = min(3, c)
    // top-`ranks` predictions of every image, ties to the lower class (as torch.topk on distinct values).
    var top = [[Int]](repeating: [], count: n)
    for i in 0..<n {
        let row = Array(probabilities[(i * c)..<((i + 1) * c)])
        top[i] = Array((0..<c).sorted { row[$0] != row[$1] ? row[$0] > row[$1] : $0 < $1 }.prefix(ranks))
    }
    var result = PseudoLabels(indices: [], labels: [], confidences: [], rankUsed: [Int](repeating: 0, count: c),
                              countPerClass: [Int](repeating: 0, count: c))
    var taken = Set<Int>()
    for cls in 0..<c {
        for rank in 0..<ranks {
            let candidates = (0..<n).filter { top[$0][rank] == cls }
            if candidates.isEmpty { continue }
            let chosen = candidates.sorted {
                let a = probabilities[$0 * c + cls], b = probabilities[$1 * c + cls]
                return a != b ? a > b : $0 < $1
            }.prefix(k)
            result.rankUsed[cls] = rank + 1
            for i in chosen where taken.insert(i).inserted {
                result.indices.append(i)
                result.labels.append(cls)
                result.confidences.append(probabilities[i * c + cls])
                result.countPerClass[cls] += 1
            }
            break
        }
    }
    return result
}
