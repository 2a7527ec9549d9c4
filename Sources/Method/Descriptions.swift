import Foundation

// Stage 1 (CDE): the sentences that describe each class, and the zero-shot classifier built from their
// CLIP text embeddings.

/// Built-in prompt templates; `{}` is replaced by the class name with underscores as spaces (as the
/// reference's `gen_labels_with_templates` does). Added to every class when `templates` is on, and the
/// whole description of a class that has no other sentences.
public enum PromptTemplates {
    public static let all: [String] = [
        "a photo of a {}.",
        "a blurry photo of a {}.",
        "a close-up photo of a {}.",
        "a cropped photo of the {}.",
        "a bright photo of a {}.",
        "a photo of the large {}.",
        "a photo of the small {}.",
        "itap of a {}.",
        "art of the {}.",
    ]

    public static func sentences(for className: String) -> [String] {
        let name = className.replacingOccurrences(of: "_", with: " ")
        return all.map { $0.replacingOccurrences(of: "{}", with: name) }
    }
}

public enum ClassDescriptions {
    /// Parses a descriptions file in the CuPL/NoLA format, `{"class name": ["sentence", ...], ...}`.
    /// Every key must be one of `classes`; every list non-empty and made of non-blank strings.
    /// Classes the file does not name are simply absent from the result (they fall back to templates).
    public static func parse(_ data: Data, classes: [String]) throws -> [String: [String]] {
        let value = try JSONValue.parse(data, code: .badDescriptions, subject: "descriptions")
        guard case .object(let object) = value else {
            throw MethodError(.badDescriptions, "descriptions", "expected a JSON object {\"class\": [\"sentence\", ...]}, found \(value.typeName)")
        }
        let known = Set(classes)
        var result: [String: [String]] = [:]
        for name in object.keys.sorted() {
            guard known.contains(name) else {
                throw MethodError(.badDescriptions, name, "not a class of this job")
            }
            guard case .array(let items) = object[name]! else {
                throw MethodError(.badDescriptions, name, "expected a list of sentences, found \(object[name]!.typeName)")
            }
            guard !items.isEmpty else { throw MethodError(.badDescriptions, name, "empty list of sentences") }
            var sentences: [String] = []
            for (i, item) in items.enumerated() {
                guard case .string(let s) = item else {
                    throw MethodError(.badDescriptions, name, "item \(i) is \(item.typeName), not a string")
                }
                let trimmed = s.trimmingCharacters(in: .whitespacesAndNewlines)
                guard !trimmed.isEmpty else { throw MethodError(.badDescriptions, name, "item \(i) is blank") }
                sentences.append(trimmed)
            }
            result[name] = sentences
        }
        return result
    }

    /// The sentences encoded for each class, in class order: its descriptions (given or generated), then
    /// the templates when `templates` is on; only the templates when it has no descriptions.
    public static func sentences(classes: [String], descriptions: [String: [String]], templates: Bool) -> [[String]] {
        classes.map { name in
            let given = descriptions[name] ?? []
            if given.isEmpty { return PromptTemplates.sentences(for: name) }
            return templates ? given + PromptTemplates.sentences(for: name) : given
        }
    }
}

/// The zero-shot (CDE) classifier: for each class, the mean of its L2-normalised sentence embeddings,
/// L2-normalised again (reference `gen_emb`).
/// `embeddings[c]` is (n_c, D) row-major CLIP text features of class c's sentences; returns (C, D).
public func buildClassifier(embeddings: [[Float]], dimension d: Int) throws -> [Float] {
    precondition(d > 0)
    var classifier = [Float](repeating: 0, count: embeddings.count * d)
    for (c, e) in embeddings.enumerated() {
        precondition(e.count % d == 0, "class \(c): \(e.count) values is not a multiple of \(d)")
        let n = e.count / d
        guard n > 0 else { throw MethodError(.badInput, "class \(c)", "no sentence embeddings") }
        var mean = [Float](repeating: 0, count: d)
        for i in 0..<n {
            let row = e[(i * d)..<((i + 1) * d)]
            let norm = row.reduce(Float(0)) { $0 + $1 * $1 }.squareRoot()
            guard norm > 0, norm.isFinite else { throw MethodError(.badInput, "class \(c)", "sentence \(i) has a zero or non-finite embedding") }
            for (j, x) in row.enumerated() { mean[j] += x / norm }
        }
        for j in 0..<d { mean[j] /= Float(n) }
        let norm = mean.reduce(Float(0)) { $0 + $1 * $1 }.squareRoot()
        guard norm > 0 else { throw MethodError(.badInput, "class \(c)", "sentence embeddings cancel out") }
        for j in 0..<d { classifier[c * d + j] = mean[j] / norm }
    }
    return classifier
}
