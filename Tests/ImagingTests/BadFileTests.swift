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
}
