import Foundation
import XCTest
@testable import Method

/// Data-parallel prompt tuning at the Method layer: a step's gradient is the sum, in unit order, of
/// units computed from zero, so who computes which unit (and in which order) does not change a bit.
final class DataParallelTuningTests: XCTestCase {
    func setup() -> (ToyEncoder, PromptTuningState, ([Int], Int) -> [Float], [Int]) {
        let (encoder, initial, pixels, teacher, _, _) = ReferenceParityTests.toySetup()
        return (encoder, initial, ReferenceParityTests.strongViews(pixels, perImage: encoder.tokens * encoder.hiddenSize), teacher)
    }

    func run(_ state: inout PromptTuningState, computeUnits: ((PromptStepPlan, PromptTuningState) throws -> [PromptUnitResult])?) throws {
        let (encoder, _, views, teacher) = setup()
        try runPromptTuning(encoder: encoder, state: &state, teacherLabels: teacher, epochs: 3, batchSize: 16,
                            microBatchSize: 5, learningRate: 0.01, weightDecay: 0.01, labelSmoothing: 0.1, seed: 99,
                            strongViews: views, computeUnits: computeUnits)
    }

    /// Two "workers" (separate encoders) computing the units out of order, one taking the odd units and
    /// the other the even ones, each unit's result passed through its database bytes: the same state,
    /// bit for bit, as one worker computing them in order.
    func testUnitsComputedElsewhereAndOutOfOrder_giveTheBitIdenticalState() throws {
        let (_, initial, views, teacher) = setup()
        var alone = initial
        try run(&alone, computeUnits: nil)
        let perEpoch = promptBatches(order: Array(0..<teacher.count), batchSize: 16).count
        XCTAssertGreaterThan(perEpoch, 1)
        XCTAssertEqual(alone.step, 3 * perEpoch)

        let workers = [setup().0, setup().0]
        var shared = initial
        var plans: [PromptStepPlan] = []
        try run(&shared, computeUnits: { plan, state in
            plans.append(plan)
            var results: [Int: PromptUnitResult] = [:]
            for u in plan.units.indices.reversed() {
                let images = plan.units[u]
                let r = try promptUnitGradient(encoder: workers[u % 2], state: state, targets: images.map { teacher[$0] },
                                               pixels: views(images, plan.epoch), logicalBatch: plan.batch.count, labelSmoothing: 0.1)
                results[u] = try XCTUnwrap(PromptUnitResult(bytes: r.bytes, count: state.gradientCount))
                XCTAssertEqual(results[u], r, "a result survives its bytes")
            }
            return plan.units.indices.map { results[$0]! }
        })
        XCTAssertEqual(plans.first?.units.map(\.count), [5, 5, 5, 1], "16 images in units of 5")
        XCTAssertEqual(plans.map(\.step), Array(1...(3 * perEpoch)))
        XCTAssertEqual(shared, alone)
        XCTAssertEqual(shared.prompts.values.map(\.bitPattern), alone.prompts.values.map(\.bitPattern))
    }

    /// The sum is taken in unit order: summing the same units in another order may round differently,
    /// which is why the owner never does.
    func testSumIsInUnitOrder_andAStepsGradientIsTheSumOfItsUnits() throws {
        let (encoder, state, views, teacher) = setup()
        let batch = Array(0..<16)
        let units = promptUnits(batch: batch, microBatchSize: 5)
        XCTAssertEqual(units, [Array(0..<5), Array(5..<10), Array(10..<15), [15]])
        let results = try units.map {
            try promptUnitGradient(encoder: encoder, state: state, targets: $0.map { teacher[$0] }, pixels: views($0, 0),
                                   logicalBatch: 16, labelSmoothing: 0.1)
        }
        let total = sumPromptUnits(results)
        var expected = results[0].gradient
        for r in results.dropFirst() { for i in expected.indices { expected[i] += r.gradient[i] } }
        XCTAssertEqual(total.gradient.map(\.bitPattern), expected.map(\.bitPattern))
        XCTAssertEqual(total.agreements, results.map(\.agreements).reduce(0, +))
        // One unit of all 16 images: the same gradient up to float rounding.
        let whole = try promptUnitGradient(encoder: encoder, state: state, targets: batch.map { teacher[$0] }, pixels: views(batch, 0),
                                           logicalBatch: 16, labelSmoothing: 0.1)
        XCTAssertEqual(whole.gradient.count, state.gradientCount)
        let scale = whole.gradient.map { abs($0) }.max()!
        XCTAssertGreaterThan(scale, 0)
        for (a, b) in zip(total.gradient, whole.gradient) { XCTAssertEqual(a, b, accuracy: 1e-5 * scale) }
        XCTAssertEqual(total.lossSum, whole.lossSum, accuracy: 1e-5)
        XCTAssertNil(PromptUnitResult(bytes: Array(total.bytes.dropLast()), count: state.gradientCount), "a short result is refused")
    }
}
