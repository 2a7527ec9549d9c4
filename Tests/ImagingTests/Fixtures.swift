import Foundation
import XCTest

/// Fixtures written by reference/make_image_fixtures.py (Pillow + torchvision), found through #filePath.
enum Fixtures {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Fixtures")

    static func manifest() throws -> [String: Any] {
        let data = try Data(contentsOf: root.appendingPathComponent("manifest.json"))
        return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any], "manifest.json is not an object")
    }

    static func bytes(_ relative: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: root.appendingPathComponent(relative)))
    }

    static func floats(_ relative: String) throws -> [Float] {
        let raw = try bytes(relative)
        return raw.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
    }
}

/// Largest absolute difference between two byte arrays of equal length, and how many bytes differ.
func byteDifference(_ a: [UInt8], _ b: [UInt8]) -> (max: Int, count: Int) {
    precondition(a.count == b.count, "byteDifference: \(a.count) vs \(b.count) bytes")
    var worst = 0, count = 0
    for i in 0..<a.count where a[i] != b[i] {
        worst = max(worst, abs(Int(a[i]) - Int(b[i])))
        count += 1
    }
    return (worst, count)
}

/// FNV-1a 64-bit hash as lowercase hex (the fixture script writes the same for large decoded images).
func fnv1a64(_ bytes: [UInt8]) -> String {
    var h: UInt64 = 0xCBF29CE484222325
    for b in bytes { h = (h ^ UInt64(b)) &* 0x100000001B3 }
    let s = String(h, radix: 16)
    return String(repeating: "0", count: 16 - s.count) + s
}
