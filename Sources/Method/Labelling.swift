import Foundation

// Stage 4: labels of every image from the tuned head, beside the zero-shot labels; and the accuracy
// of any stage against folder labels when the collection is laid out one sub-folder per class.

/// label = argmax of head (C, E) on prompted CLIP features (N, E) of the weak view; confidence = its
/// softmax probability (reference `eval_clip`). Ties go to the lower class.
public func labelImages(features: [Float], head: [Float], classCount c: Int) -> (labels: [Int], confidences: [Float]) {
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
    let (labels, values) = argmaxRows(logits, columns: c)
    return (labels, values)
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
