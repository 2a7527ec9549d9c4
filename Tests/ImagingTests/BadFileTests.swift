import Foundation
import XCTest
@testable import Imaging

final class BadFileTests: XCTestCase {
    /// Every bad file yields its typed error naming the file, and the process survives (libjpeg's and
    /// libpng's error exits are caught in CImageSupport).
    func testDecode_badFiles_throwTypedErrorsNamingTheFile() throws {
        let cases = try XCTUnwrap(try Fixtures.manifest()["bad"] as? [[String: Any]])
        XCTAssertGreaterThanOrEqual(cases.count, 10)
        for entry in cases {
            let file = entry["file"] as! String, expected = entry["error"] as! String
            let url = Fixtures.root.appendingPathComponent("bad").appendingPathComponent(file)
            do {
                let image = try decodeImage(at: url)
                XCTFail("\(file): decoded \(image.width)×\(image.height), expected \(expected)")
            } catch let error as ImageError {
                print("\(file): \(error.code): \(error)")
                let kind: String
                switch error {
                case .notFound: kind = "notFound"
                case .empty: kind = "empty"
                case .unsupportedFormat: kind = "unsupportedFormat"
                case .truncated: kind = "truncated"
                case .corrupt: kind = "corrupt"
                case .tooLarge: kind = "tooLarge"
                case .unreadable: kind = "unreadable"
                case .outOfMemory: kind = "outOfMemory"
                }
                XCTAssertEqual(kind, expected, "\(file): \(error)")
                XCTAssertEqual(error.path, url.path)
                XCTAssertTrue(error.description.contains(file), "\(error) does not name the file")
            }
        }
    }

    func testDecode_pixelLimit_isConfigurable() throws {
        let url = Fixtures.root.appendingPathComponent("images/rgb_7x5.png")
        XCTAssertEqual(try decodeImage(at: url, options: DecodeOptions(maxPixels: 35)).width, 7)
        XCTAssertThrowsError(try decodeImage(at: url, options: DecodeOptions(maxPixels: 34))) { error in
            XCTAssertEqual(error as? ImageError, .tooLarge(path: url.path, pixels: 35, limit: 34))
        }
        let jpeg = Fixtures.root.appendingPathComponent("images/rgb_420_baseline.jpg")
        XCTAssertThrowsError(try decodeImage(at: jpeg, options: DecodeOptions(maxPixels: 1000))) { error in
            XCTAssertEqual(error as? ImageError, .tooLarge(path: jpeg.path, pixels: 320 * 240, limit: 1000))
        }
    }

    func testDecode_directory_isUnreadable() {
        XCTAssertThrowsError(try decodeImage(at: Fixtures.root)) { error in
            guard case .unreadable(let path, _)? = error as? ImageError else { return XCTFail("\(error)") }
            XCTAssertEqual(path, Fixtures.root.path)
        }
    }

    /// Robustness: 600 deterministic mutations (flipped bytes, truncations, zeroed runs) of a baseline JPEG,
    /// a progressive JPEG, a CMYK JPEG and a PNG either decode or throw an ImageError naming the file;
    /// none may crash or hang the process.
    func testDecode_mutatedFiles_neverCrash() throws {
        var rng = AugmentRNG(seed: 2024)
        var decoded = 0, failed = [String: Int]()
        for name in ["rgb_420_baseline.jpg", "rgb_444_progressive.jpg", "cmyk.jpg", "rgba.png"] {
            let original = try Fixtures.bytes("images/" + name)
            for k in 0..<150 {
                var bytes = original
                switch k % 3 {
                case 0:
                    for _ in 0..<rng.int(1, 8) { bytes[rng.int(0, bytes.count)] = UInt8(rng.int(0, 256)) }
                case 1:
                    bytes = Array(bytes[0..<rng.int(1, bytes.count)])
                default:
                    let start = rng.int(0, bytes.count), length = min(rng.int(1, 64), bytes.count - start)
                    for i in start..<(start + length) { bytes[i] = 0 }
                }
                let label = "\(name)#\(k)"
                do {
                    let image = try decodeImage(bytes, name: label)
                    XCTAssertEqual(image.pixels.count, image.width * image.height * 3)
                    decoded += 1
                } catch let error as ImageError {
                    XCTAssertEqual(error.path, label)
                    failed[error.code, default: 0] += 1
                }
            }
        }
        print("mutated files: \(decoded) decoded, errors by kind \(failed.sorted { $0.key < $1.key })")
        XCTAssertEqual(decoded + failed.values.reduce(0, +), 600)
        XCTAssertGreaterThan(failed["truncated", default: 0], 50)
    }
}
