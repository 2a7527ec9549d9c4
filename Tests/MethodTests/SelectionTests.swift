import Foundation
import XCTest
@testable import Method

final class SelectionTests: XCTestCase {
    func testSelect_whenClassHasNoCandidateInTop3_getsNoPseudoLabels() {
        // 4 classes; class 3 is never in any image's top-3.
        let p: [Float] = [0.7, 0.2, 0.1, 0.0,
                          0.1, 0.6, 0.3, 0.0,
                          0.2, 0.1, 0.7, 0.0]
        let s = selectPseudoLabels(probabilities: p, classCount: 4, k: 2)
        XCTAssertEqual(s.indices, [0, 1, 2])
        XCTAssertEqual(s.labels, [0, 1, 2])
        XCTAssertEqual(s.rankUsed, [1, 1, 1, 0])
        XCTAssertEqual(s.countPerClass, [1, 1, 1, 0])
    }

    func testSelect_whenFallbackClassComesFirst_itKeepsTheImage() {
        // Class 0 is nobody's top-1; its top-2 images are 1 and 2 (by p[.,0]), which class 1 also wants.
        let p: [Float] = [0.1, 0.2, 0.7,
                          0.3, 0.6, 0.1,
                          0.4, 0.5, 0.1]
        let s = selectPseudoLabels(probabilities: p, classCount: 3, k: 2)
        XCTAssertEqual(s.indices, [2, 1, 0])
        XCTAssertEqual(s.labels, [0, 0, 2])
        XCTAssertEqual(s.rankUsed, [2, 1, 1])
        XCTAssertEqual(s.countPerClass, [2, 0, 1])
        XCTAssertEqual(s.confidences, [0.4, 0.3, 0.7])
    }

    func testSelect_whenTwoClasses_usesTop2Only() {
        let p: [Float] = [0.9, 0.1, 0.8, 0.2, 0.6, 0.4]
        let s = selectPseudoLabels(probabilities: p, classCount: 2, k: 1)
        XCTAssertEqual(s.indices, [0, 2])
        XCTAssertEqual(s.labels, [0, 1])
        XCTAssertEqual(s.rankUsed, [1, 2])
    }

    func testZeroShot_whenImageFeaturesAreZero_throwsNamingImage() {
        XCTAssertThrowsError(try zeroShotProbabilities(imageFeatures: [1, 0, 0, 0], classifier: [1, 0], dimension: 2, logitScale: 100)) {
            XCTAssertEqual(($0 as? MethodError)?.subject, "image 1")
        }
    }

    func testAlignmentModule_defaultInit_isWithinPyTorchBounds_andTrainsOnSeparableData() throws {
        var random = SeededRandom(seed: 1, stream: "alignment init")
        var module = AlignmentModule(inputSize: 64, hiddenSize: 256, classCount: 3, random: &random)
        XCTAssertTrue(module.fc1Weight.allSatisfy { abs($0) <= 1 / 8 })
        XCTAssertTrue(module.fc2Weight.allSatisfy { abs($0) <= 1 / 16 })
        XCTAssertGreaterThan(module.fc1Weight.map(abs).max()!, 0.12)
        // Three well-separated clusters, 30 points each.
        var data = SeededRandom(seed: 2)
        var x = [Float](), y = [Int]()
        for i in 0..<90 {
            let label = i % 3
            for j in 0..<64 { x.append(data.uniform(-1, 1) + (j % 3 == label ? 2 : 0)) }
            y.append(label)
        }
        var losses: [Double] = []
        try trainAlignmentModule(&module, features: x, labels: y, epochs: 20, batchSize: 32, learningRate: 1e-3, seed: 3,
                                 onEpoch: { losses.append($1) })
        XCTAssertLessThan(losses.last!, 0.1 * losses.first!)
        XCTAssertEqual(accuracy(predicted: module.labels(features: x), truth: y), 1)
        XCTAssertThrowsError(try trainAlignmentModule(&module, features: [], labels: [], epochs: 1, batchSize: 32, learningRate: 1e-3, seed: 0))
    }

    func testShuffle_isSeededPerStreamAndEpoch() {
        var a = SeededRandom(seed: 7, stream: "prompt shuffle", index: 3)
        var b = SeededRandom(seed: 7, stream: "prompt shuffle", index: 3)
        var c = SeededRandom(seed: 7, stream: "prompt shuffle", index: 4)
        let p = a.permutation(100)
        XCTAssertEqual(p, b.permutation(100))
        XCTAssertNotEqual(p, c.permutation(100))
        XCTAssertEqual(p.sorted(), Array(0..<100))
    }

    func testFolderLabels_andAccuracy() {
        let classes = ["tabby cat", "dog"]
        XCTAssertEqual(folderLabels(relativePaths: ["tabby_cat/1.jpg", "dog/a/2.png", "tabby cat/3.jpg"], classes: classes), [0, 1, 0])
        XCTAssertNil(folderLabels(relativePaths: ["tabby_cat/1.jpg", "loose.jpg"], classes: classes))
        XCTAssertNil(folderLabels(relativePaths: ["horse/1.jpg"], classes: classes))
        XCTAssertEqual(accuracy(predicted: [0, 1, 1, 0], truth: [0, 1, 0, 0]), 0.75)
    }
}
