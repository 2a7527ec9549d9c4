import Foundation
import XCTest
@testable import Method

/// The reference fixture written by reference/make_method_fixtures.py.
enum Fixture {
    static let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures/method.json")
    static let root: [String: Any] = {
        guard let data = try? Data(contentsOf: url),
              let object = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            // A missing fixture is a failure, never a skip.
            XCTFail("cannot read fixture \(url.path); run reference/make_method_fixtures.py")
            return [:]
        }
        return object
    }()

    static func section(_ name: String) -> [String: Any] {
        guard let s = root[name] as? [String: Any] else { XCTFail("fixture has no section \(name)"); return [:] }
        return s
    }
}

extension Dictionary where Key == String, Value == Any {
    func floats(_ key: String) -> [Float] {
        guard let a = self[key] as? [Any] else { XCTFail("fixture key \(key) missing"); return [] }
        return a.map { Float(($0 as! NSNumber).doubleValue) }
    }
    func ints(_ key: String) -> [Int] {
        guard let a = self[key] as? [Any] else { XCTFail("fixture key \(key) missing"); return [] }
        return a.map { ($0 as! NSNumber).intValue }
    }
    func int(_ key: String) -> Int { (self[key] as? NSNumber)?.intValue ?? { XCTFail("fixture key \(key) missing"); return 0 }() }
    func double(_ key: String) -> Double { (self[key] as? NSNumber)?.doubleValue ?? { XCTFail("fixture key \(key) missing"); return .nan }() }
    func dict(_ key: String) -> [String: Any] { (self[key] as? [String: Any]) ?? { XCTFail("fixture key \(key) missing"); return [:] }() }
}

/// Asserts |a − b| ≤ tolerance elementwise; prints the max error either way.
func assertClose(_ a: [Float], _ b: [Float], tolerance: Float, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(a.count, b.count, "\(what): sizes differ", file: file, line: line)
    var maxError: Float = 0
    for (x, y) in zip(a, b) { maxError = max(maxError, abs(x - y)) }
    if a.contains(where: { !$0.isFinite }) { maxError = .infinity }
    print("\(what): max abs error \(maxError) (tolerance \(tolerance), \(a.count) values)")
    XCTAssertLessThanOrEqual(maxError, tolerance, "\(what): max abs error \(maxError)", file: file, line: line)
}

/// A stand-in for the CLIP vision tower, implemented identically in the reference script: an image is S
/// tokens of width W; tokens = [prompts; image]; pooled = mean over tokens;
/// y = post_layernorm.weight ⊙ pooled + post_layernorm.bias; features = y · proj (W, E).
struct ToyEncoder: PromptTunableEncoder {
    let hiddenSize: Int, featureSize: Int, tokens: Int
    let proj: [Float]          // (W, E)
    let initialGamma: [Float], initialBeta: [Float]
    var trainingBytesPerImage: Int { 4 * tokens * hiddenSize }

    func initialLayerNorms() -> [NamedTensor] {
        [NamedTensor(name: "post_layernorm.weight", shape: [hiddenSize], values: initialGamma),
         NamedTensor(name: "post_layernorm.bias", shape: [hiddenSize], values: initialBeta)]
    }

    private func pooled(_ pixels: [Float], batch b: Int, prompts: [Float]) -> [Float] {
        let w = hiddenSize, p = prompts.count / w, count = Float(p + tokens)
        precondition(pixels.count == b * tokens * w)
        var pooled = [Float](repeating: 0, count: b * w)
        for i in 0..<b {
            for j in 0..<w {
                var s: Float = 0
                for t in 0..<p { s += prompts[t * w + j] }
                for t in 0..<tokens { s += pixels[(i * tokens + t) * w + j] }
                pooled[i * w + j] = s / count
            }
        }
        return pooled
    }

    func features(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor]) throws -> [Float] {
        let w = hiddenSize, e = featureSize
        let pooled = pooled(pixels, batch: b, prompts: prompts)
        var out = [Float](repeating: 0, count: b * e)
        for i in 0..<b {
            for j in 0..<w {
                let y = layerNorms[0].values[j] * pooled[i * w + j] + layerNorms[1].values[j]
                for k in 0..<e { out[i * e + k] += y * proj[j * e + k] }
            }
        }
        return out
    }

    func trainingStep(pixels: [Float], batch b: Int, prompts: [Float], layerNorms: [NamedTensor],
                      lossGradient: ([Float]) -> [Float], promptGradient: inout [Float], layerNormGradients: inout [[Float]]) throws {
        let w = hiddenSize, e = featureSize, p = prompts.count / w
        let pooled = pooled(pixels, batch: b, prompts: prompts)
        let dFeatures = lossGradient(try features(pixels: pixels, batch: b, prompts: prompts, layerNorms: layerNorms))
        for i in 0..<b {
            for j in 0..<w {
                var dy: Float = 0
                for k in 0..<e { dy += dFeatures[i * e + k] * proj[j * e + k] }
                layerNormGradients[0][j] += dy * pooled[i * w + j]
                layerNormGradients[1][j] += dy
                let dPooled = dy * layerNorms[0].values[j] / Float(p + tokens)
                for t in 0..<p { promptGradient[t * w + j] += dPooled }
            }
        }
    }
}
