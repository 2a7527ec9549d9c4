import Foundation
import XCTest
@testable import Imaging

final class DecodeAndWeakViewTests: XCTestCase {
    private func images() throws -> [[String: Any]] {
        let list = try XCTUnwrap(try Fixtures.manifest()["images"] as? [[String: Any]])
        XCTAssertGreaterThanOrEqual(list.count, 20, "fixture manifest lists too few images")
        return list
    }

    private func decode(_ file: String, exif: Bool = false) throws -> RGBImage {
        try decodeImage(at: Fixtures.root.appendingPathComponent("images").appendingPathComponent(file),
                        options: DecodeOptions(applyEXIFOrientation: exif))
    }

    /// Decoded RGB equals Pillow's `open().convert("RGB")` byte for byte on every fixture (JPEG baseline,
    /// progressive, 4:2:0/4:2:2/4:4:4, gray, CMYK, PNG RGBA/palette/16-bit/gray/1-bit, odd sizes).
    /// Pillow 13 bundles libjpeg-turbo 3.2.0, we link Debian's 2.1.5: both use the ISLOW IDCT and fancy
    /// upsampling, whose integer arithmetic did not change between them, so the bound is 0.
    func testDecode_matchesPillowByteForByte_onEveryFixture() throws {
        for entry in try images() {
            let file = entry["file"] as! String
            let image = try decode(file)
            XCTAssertEqual(image.width, entry["width"] as? Int, file)
            XCTAssertEqual(image.height, entry["height"] as? Int, file)
            let digest = fnv1a64(image.pixels)
            if let ref = entry["decoded"] as? String {
                let expected = try Fixtures.bytes(ref)
                let diff = byteDifference(image.pixels, expected)
                print("decode \(file) (\(entry["mode"]!)): max |Δ| = \(diff.max), differing bytes = \(diff.count)")
                XCTAssertEqual(diff.count, 0, "\(file): decoded RGB differs from Pillow")
            } else {
                print("decode \(file): fnv1a64 \(digest == entry["decoded_fnv1a64"] as! String ? "matches" : "DIFFERS")")
            }
            XCTAssertEqual(digest, entry["decoded_fnv1a64"] as? String, "\(file): decoded RGB differs from Pillow")
        }
    }

    func testDecode_withEXIFOrientation_matchesPillowExifTranspose() throws {
        var checked = 0
        for entry in try images() {
            guard let exif = entry["exif"] as? [String: Any] else { continue }
            let file = entry["file"] as! String
            let image = try decode(file, exif: true)
            XCTAssertEqual(image.width, exif["width"] as? Int, file)
            XCTAssertEqual(image.height, exif["height"] as? Int, file)
            let diff = byteDifference(image.pixels, try Fixtures.bytes(exif["file"] as! String))
            print("exif_transpose \(file): differing bytes = \(diff.count)")
            XCTAssertEqual(diff.count, 0, file)
            // Off by default: the stored orientation.
            let plain = try decode(file)
            XCTAssertEqual(plain.width, entry["width"] as? Int, file)
            checked += 1
        }
        XCTAssertEqual(checked, 7, "expected EXIF orientations 2...8 (3 and 6 in JPEG APP1, the others in PNG eXIf)")
    }

    /// The uint8 weak-view crop (Resize bicubic + CenterCrop) equals torchvision's byte for byte, and the
    /// normalised tensor equals ToTensor + Normalize exactly (same Float32 operations).
    func testWeakView_matchesTorchvisionByteForByte_onEveryFixture() throws {
        var views = 0, tensors = 0
        for entry in try images() {
            let file = entry["file"] as! String
            let image = try decode(file)
            for view in entry["views"] as! [[String: Any]] {
                let resize = view["resize"] as! Int, crop = view["crop"] as! Int
                let out = weakViewCrop(image, resize: resize, crop: crop)
                XCTAssertEqual(out.width, crop)
                XCTAssertEqual(out.height, crop)
                let diff = byteDifference(out.pixels, try Fixtures.bytes(view["file"] as! String))
                print("weak view \(file) resize \(resize) crop \(crop): max |Δ| = \(diff.max), differing bytes = \(diff.count)")
                XCTAssertEqual(diff.count, 0, "\(file): weak view \(resize)/\(crop) differs from torchvision")
                views += 1
                for (key, mean, std) in [("clip_tensor", WeakViewConfig.clipMean, WeakViewConfig.clipStd),
                                         ("imagenet_tensor", WeakViewConfig.imagenetMean, WeakViewConfig.imagenetStd)] {
                    guard let ref = view[key] as? String else { continue }
                    let expected = try Fixtures.floats(ref)
                    let got = weakView(image, config: WeakViewConfig(resize: resize, crop: crop, mean: mean, std: std))
                    XCTAssertEqual(got.count, expected.count)
                    var worst: Float = 0
                    for i in 0..<got.count { worst = max(worst, abs(got[i] - expected[i])) }
                    print("normalised \(key) \(file): max |Δ| = \(worst)")
                    XCTAssertEqual(worst, 0, "\(file): \(key) differs from torchvision")
                    tensors += 1
                }
            }
        }
        XCTAssertGreaterThanOrEqual(views, 33)
        XCTAssertEqual(tensors, 6)
    }

    /// The optional fast path (off by default): a 1000×750 JPEG decoded at 1/2 DCT scale for a 224 view.
    /// Not Pillow-exact by design; measured effect on the weak-view crop, bounded here.
    func testReducedDCTScale_halvesTheDecode_andStaysCloseToTheExactWeakView() throws {
        let url = Fixtures.root.appendingPathComponent("images/larger_1000x750.jpg")
        let fast = try decodeImage(at: url, options: DecodeOptions(jpegReducedScaleMinSide: 224))
        XCTAssertEqual(fast.width, 500)
        XCTAssertEqual(fast.height, 375)
        let view = weakViewCrop(fast, resize: 224, crop: 224)
        let expected = try Fixtures.bytes("ref/larger_1000x750.jpg.weak_224_224.rgb")
        var total = 0, worst = 0
        for i in 0..<expected.count {
            let d = abs(Int(view.pixels[i]) - Int(expected[i]))
            total += d
            worst = max(worst, d)
        }
        let mean = Double(total) / Double(expected.count)
        print("reduced DCT scale 1/2 vs exact weak view: mean |Δ| = \(mean), max |Δ| = \(worst)")
        // Measured 0.39 / 14 (libjpeg's 4×4 IDCT instead of 8×8 + a smaller bicubic support).
        XCTAssertLessThanOrEqual(mean, 1.0)
        XCTAssertLessThanOrEqual(worst, 32)
        // A small image is never reduced.
        let small = try decodeImage(at: Fixtures.root.appendingPathComponent("images/rgb_420_baseline.jpg"),
                                    options: DecodeOptions(jpegReducedScaleMinSide: 224))
        XCTAssertEqual(small.width, 320)
    }

    /// Decoding keeps no shared state: the same files decoded on several threads at once give the same pixels.
    func testDecode_onConcurrentThreads_givesTheSamePixels() throws {
        let files = try images().map { $0["file"] as! String }
        let serial = try files.map { fnv1a64(try decode($0).pixels) }
        let lock = NSLock()
        var parallel = [String?](repeating: nil, count: files.count * 4)
        DispatchQueue.concurrentPerform(iterations: files.count * 4) { i in
            let hash = (try? decode(files[i % files.count])).map { fnv1a64($0.pixels) }
            lock.lock()
            parallel[i] = hash
            lock.unlock()
        }
        for i in 0..<parallel.count { XCTAssertEqual(parallel[i], serial[i % files.count], files[i % files.count]) }
    }

    func testWeakViewBatch_fillsEverySlot_andReportsBadFilesByIndex() throws {
        let dir = Fixtures.root
        let files = [dir.appendingPathComponent("images/rgb_420_baseline.jpg"), dir.appendingPathComponent("bad/truncated.jpg"),
                     dir.appendingPathComponent("images/cmyk.jpg"), dir.appendingPathComponent("bad/missing.jpg")]
        let config = WeakViewConfig(resize: 64, crop: 64, mean: WeakViewConfig.clipMean, std: WeakViewConfig.clipStd)
        let batch = weakViewBatch(files, config: config, threads: 2)
        XCTAssertEqual(batch.tensor.count, 4 * 3 * 64 * 64)
        XCTAssertEqual(Set(batch.errors.keys), [1, 3])
        XCTAssertEqual(batch.errors[1]?.code, "truncated")
        XCTAssertEqual(batch.errors[3], .notFound(path: files[3].path))
        let slot = 3 * 64 * 64
        XCTAssertEqual(Array(batch.tensor[0..<slot]), try Fixtures.floats("ref/rgb_420_baseline.jpg.weak_64_64.clip.f32"))
        XCTAssertEqual(Array(batch.tensor[2 * slot..<3 * slot]), try Fixtures.floats("ref/cmyk.jpg.weak_64_64.clip.f32"))
        XCTAssertTrue(batch.tensor[slot..<2 * slot].allSatisfy { $0 == 0 })
    }

    func testCenterCropOrigin_usesPythonRoundHalfEven_andPadsSmallImages() {
        // (225 - 224) / 2 = 0.5 → 0; (227 - 224) / 2 = 1.5 → 2 (Python round).
        XCTAssertEqual(centerCropOrigin(width: 225, height: 227, cropWidth: 224, cropHeight: 224).x, 0)
        XCTAssertEqual(centerCropOrigin(width: 225, height: 227, cropWidth: 224, cropHeight: 224).y, 2)
        let small = RGBImage(width: 2, height: 1, pixels: [10, 20, 30, 40, 50, 60])
        let padded = centerCrop(small, width: 5, height: 3)
        // torchvision pads left (5-2)//2 = 1, top (3-1)//2 = 1.
        XCTAssertEqual(Array(padded.pixels[(1 * 5 + 1) * 3..<(1 * 5 + 3) * 3]), [10, 20, 30, 40, 50, 60])
        XCTAssertEqual(padded.pixels.reduce(0) { $0 + Int($1) }, 210)
    }
}
