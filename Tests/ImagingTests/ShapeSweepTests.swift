import Foundation
import XCTest
@testable import Imaging

/// The shape sweep of reference/make_image_fixtures.py (`shape_sweep`): weak views, plain Pillow resizes and
/// RandomResizedCrop's resized_crop on many shapes, each compared byte for byte with Pillow 13 + torchvision.
/// The reference outputs are stored as PNGs and read with nolad's PNG decoder (byte-exact against Pillow on
/// every PNG fixture, DecodeAndWeakViewTests).
final class ShapeSweepTests: XCTestCase {
    private func sweep(_ key: String) throws -> [[String: Any]] {
        let sweep = try XCTUnwrap(try Fixtures.manifest()["sweep"] as? [String: Any], "manifest has no shape sweep")
        return try XCTUnwrap(sweep[key] as? [[String: Any]], "sweep has no \(key)")
    }

    private func decode(_ relative: String) throws -> RGBImage {
        try decodeImage(at: Fixtures.root.appendingPathComponent(relative))
    }

    /// Compares and prints one case; returns whether it matched.
    @discardableResult
    private func compare(_ got: RGBImage, _ expected: RGBImage, _ label: String) -> Bool {
        XCTAssertEqual(got.width, expected.width, label)
        XCTAssertEqual(got.height, expected.height, label)
        guard got.pixels.count == expected.pixels.count else { return false }
        let diff = byteDifference(got.pixels, expected.pixels)
        print("\(label): differing bytes = \(diff.count), max |Δ| = \(diff.max)")
        XCTAssertEqual(diff.count, 0, "\(label): differs from Pillow/torchvision in \(diff.count) bytes (max |Δ| \(diff.max))")
        return diff.count == 0
    }

    /// Resize(n, BICUBIC) + CenterCrop(crop) on JPEG (baseline, progressive, gray, CMYK) and PNG files of
    /// every shape class: tall, wide, odd, exactly 224, smaller than the crop, over 1000 px, 1:20, 1×N.
    /// With Pillow 12's order (always horizontal first) the 333×1000 view differs in 2,473 of 150,528 bytes (max 4).
    func testWeakView_matchesTorchvisionByteForByte_onEveryShape() throws {
        let views = try sweep("views")
        XCTAssertEqual(views.count, 26)
        var verticalFirst = 0, matched = 0
        for v in views {
            let file = v["file"] as! String
            let resize = v["resize"] as! Int, crop = v["crop"] as! Int
            let image = try decode(file)
            XCTAssertEqual(image.width, v["width"] as? Int, file)
            XCTAssertEqual(image.height, v["height"] as? Int, file)
            let resized = v["resized"] as! [Int]
            let size = shorterSideSize(width: image.width, height: image.height, size: resize)
            XCTAssertEqual([size.width, size.height], resized, "\(file): torchvision's Resize output size")
            let horizontalFirst = v["horizontal_first"] as! Bool
            XCTAssertEqual(horizontalPassFirst(inWidth: image.width, inHeight: image.height, outWidth: size.width, outHeight: size.height),
                           horizontalFirst, "\(file): pass order")
            if !horizontalFirst { verticalFirst += 1 }
            let label = "weak view \(file) (\(v["mode"]!), \(v["format"]!)) resize \(resize) crop \(crop)"
            if compare(weakViewCrop(image, resize: resize, crop: crop), try decode(v["view"] as! String), label) { matched += 1 }
        }
        print("weak views: \(matched) of \(views.count) byte-exact, \(verticalFirst) with the vertical pass first")
        XCTAssertGreaterThanOrEqual(verticalFirst, 4, "the sweep no longer covers Pillow's vertical-first order")
    }

    /// Pillow's Image.resize (bicubic and bilinear) of crops of one photo to many sizes, both pass orders,
    /// down- and upscaling on either axis, aspect ratios up to 1:20, 1×N sources and 1×1 outputs.
    func testResample_matchesPillowByteForByte_onEveryShapePair() throws {
        let cases = try sweep("resizes")
        XCTAssertEqual(cases.count, 42)
        var sources: [String: RGBImage] = [:]
        var verticalFirst = 0
        for c in cases {
            let name = c["source"] as! String
            let photo = try sources[name] ?? decode(name)
            sources[name] = photo
            let crop = c["crop"] as! [Int], size = c["size"] as! [Int]
            let filter: ResampleFilter = c["filter"] as! String == "bicubic" ? .bicubic : .bilinear
            let src = cropImage(photo, left: 0, top: 0, width: crop[0], height: crop[1])
            if !(c["horizontal_first"] as! Bool) { verticalFirst += 1 }
            XCTAssertEqual(horizontalPassFirst(inWidth: crop[0], inHeight: crop[1], outWidth: size[0], outHeight: size[1]),
                           c["horizontal_first"] as? Bool)
            let label = "resize \(crop[0])×\(crop[1]) → \(size[0])×\(size[1]) \(c["filter"]!)"
            let expected = try decode(c["out"] as! String)
            compare(resample(src, width: size[0], height: size[1], filter: filter), expected, label)
            // A window of the resize (the weak view's shortcut) is the same window of the full resize.
            if size[0] >= 3 && size[1] >= 3 {
                let window = (x: size[0] / 3, y: size[1] / 3, width: size[0] - size[0] / 3 - 1, height: size[1] - size[1] / 3 - 1)
                compare(resample(src, width: size[0], height: size[1], filter: filter, crop: window),
                        cropImage(expected, left: window.x, top: window.y, width: window.width, height: window.height),
                        label + " window \(window)")
            }
        }
        XCTAssertGreaterThanOrEqual(verticalFirst, 18)
    }

    /// torchvision's F.resized_crop (RandomResizedCrop's op in the strong view) on tall, wide, thin and
    /// near-square boxes, to 64 and 224.
    func testResizedCrop_matchesTorchvisionByteForByte_onEveryBox() throws {
        let cases = try sweep("resized_crops")
        XCTAssertEqual(cases.count, 12)
        var photo: RGBImage?
        var verticalFirst = 0
        for c in cases {
            let image = try photo ?? decode(c["source"] as! String)
            photo = image
            let top = c["top"] as! Int, left = c["left"] as! Int, h = c["height"] as! Int, w = c["width"] as! Int
            let size = c["size"] as! Int
            if !(c["horizontal_first"] as! Bool) { verticalFirst += 1 }
            compare(resizedCrop(image, top: top, left: left, height: h, width: w, size: size),
                    try decode(c["out"] as! String), "resized_crop top \(top) left \(left) \(h)×\(w) → \(size)")
        }
        XCTAssertGreaterThanOrEqual(verticalFirst, 6)
    }

    /// Pillow 13's rule, on the cases that decide it: the height must shrink, by more than twice the width's shrink.
    func testHorizontalPassFirst_followsPillow13() {
        XCTAssertFalse(horizontalPassFirst(inWidth: 333, inHeight: 1000, outWidth: 224, outHeight: 672))  // 328 > 218
        XCTAssertTrue(horizontalPassFirst(inWidth: 1000, inHeight: 333, outWidth: 672, outHeight: 224))
        XCTAssertTrue(horizontalPassFirst(inWidth: 400, inHeight: 401, outWidth: 224, outHeight: 224))   // 177 < 352
        XCTAssertTrue(horizontalPassFirst(inWidth: 7, inHeight: 9, outWidth: 224, outHeight: 288))       // height grows
        XCTAssertFalse(horizontalPassFirst(inWidth: 7, inHeight: 900, outWidth: 224, outHeight: 288))    // width grows
        XCTAssertTrue(horizontalPassFirst(inWidth: 100, inHeight: 220, outWidth: 40, outHeight: 100))    // 120 == 2 × 60
        XCTAssertFalse(horizontalPassFirst(inWidth: 100, inHeight: 221, outWidth: 40, outHeight: 100))   // 121 > 120
    }
}
