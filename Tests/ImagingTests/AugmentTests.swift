import Foundation
import XCTest
@testable import Imaging

final class AugmentTests: XCTestCase {
    private var source: RGBImage!
    private var ops: [String: [String: Any]] = [:]

    override func setUpWithError() throws {
        let manifest = try Fixtures.manifest()
        let info = try XCTUnwrap(manifest["op_source"] as? [String: Any])
        source = RGBImage(width: info["width"] as! Int, height: info["height"] as! Int, pixels: try Fixtures.bytes(info["file"] as! String))
        for op in try XCTUnwrap(manifest["ops"] as? [[String: Any]]) { ops[op["name"] as! String] = op }
        XCTAssertEqual(ops.count, 21, "fixture manifest lists a different set of ops")
    }

    override func tearDown() {
        // XCTest keeps test case instances alive; drop the fixtures so leak checkers stay quiet.
        source = nil
        ops = [:]
    }

    /// Compares with the torchvision/Pillow output of op `name`: at most `maxDiff` per byte and at most
    /// `maxFraction` of the bytes differing. Prints both figures.
    private func check(_ name: String, _ out: RGBImage, maxDiff: Int = 0, maxFraction: Double = 0,
                       file: StaticString = #filePath, line: UInt = #line) throws {
        let ref = try XCTUnwrap(ops[name], "no fixture for \(name)")
        XCTAssertEqual(out.width, ref["width"] as? Int, name, file: file, line: line)
        XCTAssertEqual(out.height, ref["height"] as? Int, name, file: file, line: line)
        let expected = try Fixtures.bytes(ref["file"] as! String)
        guard out.pixels.count == expected.count else { return XCTFail("\(name): size mismatch", file: file, line: line) }
        let diff = byteDifference(out.pixels, expected)
        let fraction = Double(diff.count) / Double(expected.count)
        print("\(name): max |Δ| = \(diff.max), differing bytes = \(diff.count) (\(String(format: "%.4f", fraction * 100))%)")
        XCTAssertLessThanOrEqual(diff.max, maxDiff, "\(name): max difference", file: file, line: line)
        XCTAssertLessThanOrEqual(fraction, maxFraction, "\(name): fraction of differing bytes", file: file, line: line)
    }

    private func params(_ name: String) -> [String: Any] { ops[name]!["params"] as! [String: Any] }

    /// Extremes: a 3×2 image whose box-blur radius exceeds its lines, and a resize down to 1×3.
    func testBlurAndResize_onTinyImages_matchPillowExactly() throws {
        let info = try XCTUnwrap(try Fixtures.manifest()["op_tiny_source"] as? [String: Any])
        let tiny = RGBImage(width: 3, height: 2, pixels: try Fixtures.bytes(info["file"] as! String))
        try check("blur_tiny_2.0", gaussianBlur(tiny, radius: 2.0))
        try check("resize_bicubic_1x3", resizeBicubic(source, width: 1, height: 3))
    }

    func testResize_bicubicUpAndBilinearDown_matchPillowExactly() throws {
        try check("resize_bicubic_up", resizeBicubic(source, width: 131, height: 101))
        try check("resize_bilinear_down", resample(source, width: 37, height: 29, filter: .bilinear))
    }

    func testResizedCrop_matchesTorchvisionExactly() throws {
        for name in ["resized_crop", "resized_crop_up"] {
            let p = params(name)
            let out = resizedCrop(source, top: p["top"] as! Int, left: p["left"] as! Int, height: p["height"] as! Int,
                                  width: p["width"] as! Int, size: p["size"] as! Int)
            try check(name, out)
        }
    }

    func testHorizontalFlip_matchesTorchvisionExactly() throws {
        try check("hflip", flipHorizontal(source))
    }

    /// Brightness, contrast, saturation: Pillow's blend in float32, reproduced operation for operation.
    func testColorAdjustments_matchTorchvisionExactly() throws {
        for f in ["0.63", "1.37"] {
            let factor = Double(f)!
            try check("brightness_\(f)", adjustBrightness(source, factor: factor))
            try check("contrast_\(f)", adjustContrast(source, factor: factor))
            try check("saturation_\(f)", adjustSaturation(source, factor: factor))
        }
    }

    /// Hue: Pillow's RGB↔HSV with its float/double mix, uint8 hue shift with wrap-around.
    func testHue_matchesTorchvisionExactly() throws {
        for f in ["-0.09", "0.04", "0.1"] {
            try check("hue_\(f)", adjustHue(source, factor: Double(f)!))
        }
    }

    /// Perspective: coefficients solved in double and rounded to float32 like torchvision's lstsq (we use
    /// elimination, so a coefficient may differ in its last float bit), then Pillow's bicubic transform.
    /// Bound: coefficients within 1e-6 relative; pixels within 1 on ≤ 0.5 % of bytes (a sample landing on
    /// the other side of a pixel centre or a float rounding in the cubic).
    func testPerspective_matchesTorchvision() throws {
        let p = params("perspective")
        let start = (p["start"] as! [[Int]]).map { ($0[0], $0[1]) }
        let end = (p["end"] as! [[Int]]).map { ($0[0], $0[1]) }
        let coeffs = perspectiveCoefficients(start: start, end: end)
        let reference = (p["coeffs"] as! [Double]).map { Float($0) }
        var worst: Float = 0
        for i in 0..<8 { worst = max(worst, abs(coeffs[i] - reference[i]) / max(abs(reference[i]), 1e-6)) }
        print("perspective coefficients: max relative |Δ| = \(worst)")
        XCTAssertLessThanOrEqual(worst, 1e-6)
        try check("perspective", perspective(source, coefficients: reference))
        try check("perspective", perspective(source, coefficients: coeffs), maxDiff: 1, maxFraction: 0.005)
    }

    /// The fast perspective (R, G, B in SIMD lanes) against the one-channel-at-a-time reference: the same
    /// bytes on random images of many sizes (2 × 2 to wider than tall) with corners sampled as RandomPerspective does (distortion 0.2, the strong view's, and 0.45).
    func testPerspective_sameBytesAsTheOneChannelReference() {
        var rng = AugmentRNG(seed: 7)
        var images = 0, moved = 0
        for (w, h) in [(2, 2), (2, 3), (5, 2), (17, 9), (64, 64), (224, 224), (301, 117)] {
            let pixels = (0..<(w * h * 3)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            let image = RGBImage(width: w, height: h, pixels: pixels)
            for distortion in [0.2, 0.45] {
                let c = samplePerspective(width: w, height: h, distortion: distortion, rng: &rng)
                let fast = perspective(image, coefficients: c).pixels
                XCTAssertEqual(fast, perspectiveReference(image, coefficients: c).pixels, "\(w)×\(h), distortion \(distortion)")
                images += 1
                if fast != pixels { moved += 1 }
                // Corners move by up to distortion · half the size, drawn from 0: on small images maybe not at all.
                if min(w, h) >= 64 { XCTAssertTrue(fast != pixels, "\(w)×\(h): the transform moved nothing") }
            }
        }
        print("perspective: \(images) images the same bytes as the reference (\(moved) changed by the transform)")
    }

    /// Pillow's GaussianBlur (three fractional box blurs in fixed point).
    func testGaussianBlur_matchesPillowExactly() throws {
        for r in ["0.1", "0.7", "1.93"] {
            try check("blur_\(r)", gaussianBlur(source, radius: Double(r)!))
        }
    }

    /// A whole strong view with fixed parameters equals torchvision's functional ops applied in NoLA's order.
    func testApplyStrongView_withFixedParameters_matchesTorchvisionComposition() throws {
        let p = params("strong_view")
        let crop = p["crop"] as! [Int]
        func jitter(_ j: [String: Any]) -> ColorJitterParameters {
            ColorJitterParameters(order: j["order"] as! [Int], brightness: j["b"] as! Double, contrast: j["c"] as! Double,
                                  saturation: j["s"] as! Double, hue: j["h"] as! Double)
        }
        let start = (p["start"] as! [[Int]]).map { ($0[0], $0[1]) }
        let end = (p["end"] as! [[Int]]).map { ($0[0], $0[1]) }
        let parameters = StrongViewParameters(
            cropTop: crop[0], cropLeft: crop[1], cropHeight: crop[2], cropWidth: crop[3], flip: true,
            jitter: jitter(p["jitter"] as! [String: Any]), perspective: perspectiveCoefficients(start: start, end: end),
            secondJitter: jitter(p["jitter2"] as! [String: Any]), blurRadius: p["blur"] as? Double)
        try check("strong_view", applyStrongView(source, parameters, size: p["size"] as! Int))
    }

    func testSampler_isDeterministicPerSeed_andDrawsInTorchvisionsRanges() throws {
        var a = AugmentRNG(seed: 7), b = AugmentRNG(seed: 7)
        let config = StrongViewConfig()
        var flips = 0, jitters = 0, perspectives = 0, areas: [Double] = [], ratios: [Double] = []
        let n = 20000
        for _ in 0..<n {
            let p = sampleStrongView(width: 500, height: 375, config: config, rng: &a)
            XCTAssertEqual(p, sampleStrongView(width: 500, height: 375, config: config, rng: &b))
            XCTAssertTrue(p.cropTop >= 0 && p.cropLeft >= 0 && p.cropTop + p.cropHeight <= 375 && p.cropLeft + p.cropWidth <= 500)
            let ratio = Double(p.cropWidth) / Double(p.cropHeight)
            XCTAssertTrue(ratio > 0.70 && ratio < 1.40, "ratio \(ratio)")
            areas.append(Double(p.cropWidth * p.cropHeight) / (500 * 375))
            ratios.append(ratio)
            if p.flip { flips += 1 }
            if let j = p.jitter {
                jitters += 1
                XCTAssertEqual(j.order.sorted(), [0, 1, 2, 3])
                XCTAssertTrue((0.6...1.4).contains(j.brightness) && (0.6...1.4).contains(j.contrast) && (0.6...1.4).contains(j.saturation))
                XCTAssertTrue((-0.1...0.1).contains(j.hue))
            }
            if p.perspective != nil { perspectives += 1 }
            XCTAssertNotNil(p.secondJitter)
            XCTAssertTrue((0.1...2.0).contains(p.blurRadius!))
        }
        let meanArea = areas.reduce(0, +) / Double(n)
        let stdArea = (areas.map { ($0 - meanArea) * ($0 - meanArea) }.reduce(0, +) / Double(n)).squareRoot()
        let meanRatio = ratios.reduce(0, +) / Double(n)
        let torch = try XCTUnwrap(try Fixtures.manifest()["resized_crop_distribution"] as? [String: Any])
        print("sampler over \(n) draws: flip \(Double(flips) / Double(n)), jitter \(Double(jitters) / Double(n)), perspective \(Double(perspectives) / Double(n))")
        print("crop area mean \(meanArea) std \(stdArea), ratio mean \(meanRatio); torchvision: \(torch["mean_area"]!) \(torch["std_area"]!) \(torch["mean_ratio"]!)")
        XCTAssertEqual(Double(flips) / Double(n), 0.5, accuracy: 0.015)
        XCTAssertEqual(Double(jitters) / Double(n), 0.8, accuracy: 0.03)
        XCTAssertEqual(Double(perspectives) / Double(n), 0.5, accuracy: 0.03)
        // torchvision's own 20000 draws (different generator): means agree within a few standard errors.
        XCTAssertEqual(meanArea, torch["mean_area"] as! Double, accuracy: 0.008)
        XCTAssertEqual(stdArea, torch["std_area"] as! Double, accuracy: 0.008)
        XCTAssertEqual(meanRatio, torch["mean_ratio"] as! Double, accuracy: 0.008)
        XCTAssertGreaterThanOrEqual(areas.min()!, 0.19)
        var c = AugmentRNG(seed: 8)
        XCTAssertNotEqual(sampleStrongView(width: 500, height: 375, rng: &c), sampleStrongView(width: 500, height: 375, rng: &b))
    }

    func testStrongView_producesNormalisedTensorOfTheConfiguredSize() {
        var rng = AugmentRNG(seed: 1)
        var config = StrongViewConfig()
        config.size = 48
        let out = strongView(source, config: config, rng: &rng)
        XCTAssertEqual(out.count, 3 * 48 * 48)
        XCTAssertTrue(out.allSatisfy { $0.isFinite && abs($0) < 3 })
    }
}
