import Method
import XCTest

final class SignalsTests: XCTestCase {
    /// Four images, scores 0.9, 0.8, 0.8, 0.3 with labels right, wrong, right, wrong. The two 0.8s are one
    /// group kept in a random order: corners (0,0) (1,1) (3,2) (4,2); kept 1..4 → correct 1, 1.5, 2, 2.
    func testRiskCoverage_handMadeCase_tiesCountedAsTheirExpectedValue() {
        let rc = RiskCoverage(scores: [0.8, 0.9, 0.3, 0.8], correct: [false, true, false, true])
        XCTAssertEqual(rc.corners.map { [$0.kept, $0.correct] }, [[0, 0], [1, 1], [3, 2], [4, 2]])
        XCTAssertEqual(rc.count, 4)
        XCTAssertEqual(rc.accuracy, 0.5)
        XCTAssertEqual(rc.curve, [1, 0.75, 2.0 / 3.0, 0.5])
        XCTAssertEqual(rc.area, (1 + 0.75 + 2.0 / 3.0 + 0.5) / 4, accuracy: 1e-12)   // 0.729167
        XCTAssertEqual(rc.accuracy(coverage: 0.5), 0.75, accuracy: 1e-12)               // 1.5 of 2 kept
        XCTAssertEqual(rc.accuracy(coverage: 0.8), 2 / 3.2, accuracy: 1e-12)            // 2 of 3.2 kept
        XCTAssertEqual(rc.accuracy(coverage: 0.25), 1, accuracy: 1e-12)
        // A signal that knows nothing (one group) has the accuracy everywhere; a perfect one puts errors last.
        let blind = RiskCoverage(scores: [1, 1, 1, 1], correct: [false, true, false, true])
        XCTAssertEqual(blind.area, 0.5, accuracy: 1e-12)
        XCTAssertEqual(blind.accuracy(coverage: 0.8), 0.5, accuracy: 1e-12)
        let perfect = RiskCoverage(scores: [0.1, 0.9, 0.2, 0.8], correct: [false, true, false, true])
        XCTAssertEqual(perfect.accuracy(coverage: 0.5), 1)
        XCTAssertEqual(perfect.area, (1 + 1 + 2.0 / 3 + 0.5) / 4, accuracy: 1e-12)
    }

    func testLabelSignals_topClassesMarginAndAgreement() {
        let row: [Float] = [0.1, 0.5, 0.1, 0.3]
        let s = LabelSignals(probabilities: row[...], count: 3, zeroShot: 1, teacher: 3)
        XCTAssertEqual(s.top, [1, 3, 0], "ties (0.1, 0.1) go to the lower class")
        XCTAssertEqual(s.probabilities, [0.5, 0.3, 0.1])
        XCTAssertEqual(s.margin, 0.2, accuracy: 1e-6)
        XCTAssertEqual(s.label, 1)
        XCTAssertFalse(s.agreement, "the teacher says 3")
        XCTAssertTrue(LabelSignals(probabilities: row[...], count: 3, zeroShot: 1, teacher: 1).agreement)
        XCTAssertTrue(LabelSignals(probabilities: row[...], count: 3, zeroShot: 1, teacher: nil).agreement, "no teacher: final = zero-shot")
        XCTAssertFalse(LabelSignals(probabilities: row[...], count: 3, zeroShot: 0, teacher: nil).agreement)
        let single = LabelSignals(probabilities: [1][...], count: 3, zeroShot: 0, teacher: 0)
        XCTAssertEqual(single.top, [0])
        XCTAssertEqual(single.margin, 1)
    }

    func testAbstentionRule_reasonsInWords() {
        let names = ["cat", "dog", "fox"]
        let s = LabelSignals(probabilities: [0.31, 0.30, 0.39][...], count: 3, zeroShot: 0, teacher: 1)
        XCTAssertNil(AbstentionRule().judge(s, zeroShot: 0, names: names), "the defaults abstain on nothing")
        XCTAssertFalse(AbstentionRule().isActive)
        let all = AbstentionRule(confidenceBelow: 0.4, marginBelow: 0.1, unlessAgree: true).judge(s, zeroShot: 0, names: names)
        XCTAssertEqual(all?.reasons, [.confidence, .margin, .disagreement])
        XCTAssertEqual(all?.text, "confidence 0.39 below 0.4; margin 0.08 below 0.1; no agreement: final fox, zero-shot cat, teacher dog")
        // The value is shown with as many decimals as it takes to be below the bound.
        let close = LabelSignals(probabilities: [0.39999, 0.3, 0.30001][...], count: 3, zeroShot: 0, teacher: 0)
        XCTAssertEqual(AbstentionRule(confidenceBelow: 0.4).judge(close, zeroShot: 0, names: names)?.text, "confidence 0.39999 below 0.4")
        XCTAssertNil(AbstentionRule(confidenceBelow: 0.3, marginBelow: 0.05).judge(s, zeroShot: 0, names: names))
    }
}
