import Foundation

/// How well a signal ranks a job's errors: keep the images the signal trusts most, a growing fraction of
/// them, and watch the accuracy of what is kept (a risk-coverage curve; docs/labels.md). Images the signal
/// cannot tell apart (equal scores) are kept together, each group in a random order, so the curve between
/// a group's ends is the expected one: the correct count grows linearly across the group.
public struct RiskCoverage: Equatable, Sendable {
    /// (kept, correct) at every end of a group of equal scores, from (0, 0) to (N, all correct).
    public let corners: [Corner]

    public struct Corner: Equatable, Sendable {
        public let kept: Int
        public let correct: Int
    }

    /// `scores[i]`: how much the signal trusts image i (higher is kept first); `correct[i]`: whether its
    /// label is right. Not empty, same length.
    public init(scores: [Double], correct: [Bool]) {
        precondition(!scores.isEmpty && scores.count == correct.count)
        let order = scores.indices.sorted { scores[$0] > scores[$1] }
        var corners = [Corner(kept: 0, correct: 0)]
        var kept = 0, right = 0
        for (j, i) in order.enumerated() {
            kept += 1
            if correct[i] { right += 1 }
            if j + 1 == order.count || scores[order[j + 1]] != scores[i] { corners.append(Corner(kept: kept, correct: right)) }
        }
        self.corners = corners
    }

    public var count: Int { corners.last!.kept }
    /// Accuracy of all the labels (coverage 1).
    public var accuracy: Double { Double(corners.last!.correct) / Double(count) }

    /// Expected number of correct labels among the `kept` most trusted (0 ≤ kept ≤ N, not necessarily whole).
    public func correct(kept x: Double) -> Double {
        precondition(x >= 0 && x <= Double(count))
        guard let upper = corners.firstIndex(where: { Double($0.kept) >= x }), upper > 0 else { return 0 }
        let a = corners[upper - 1], b = corners[upper]
        let t = (x - Double(a.kept)) / Double(b.kept - a.kept)
        return Double(a.correct) + t * Double(b.correct - a.correct)
    }

    /// Accuracy of the labels kept at `coverage` (0 < coverage ≤ 1) of the images.
    public func accuracy(coverage: Double) -> Double {
        precondition(coverage > 0 && coverage <= 1)
        let x = coverage * Double(count)
        return correct(kept: x) / x
    }

    /// Accuracy after keeping k = 1, ..., N images.
    public var curve: [Double] { (1...count).map { correct(kept: Double($0)) / Double($0) } }

    /// Area under the accuracy-coverage curve: the mean of `curve` (1 for a signal that puts every error
    /// last and the labels all right; the accuracy itself for a signal that knows nothing).
    public var area: Double { curve.reduce(0, +) / Double(count) }
}
