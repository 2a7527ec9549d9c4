// MobileCLIP's standard view (open_clip's eval transform for its preprocess_cfg: bilinear shorter-side
// resize, centre crop, mean 0 / std 1) against open_clip + Pillow on real JPEGs, and the tiny MobileCLIP-B
// folder's embedding of that view (reference/make_mobileclip_model_fixtures.py). Pixels ≤ 1e-5 absolute,
// embeddings ≤ 1e-4 × their max magnitude; each comparison prints its error.
import Foundation
import Imaging
import Kernels
import Models
import XCTest
@testable import Method

final class MobileCLIPViewTests: XCTestCase {
    static let repository = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let images = ["larger_1000x750.jpg", "rgb_420_progressive_odd.jpg", "rgb_422.jpg", "gray.jpg"]

    override func invokeTest() { withThreads(2) { super.invokeTest() } }

    func testMobileCLIPStandardView_onJPEGs_matchesOpenCLIPTransformAndEmbedding() throws {
        let folder = Self.repository.appendingPathComponent("Tests/ModelsTests/Fixtures/mobileclip-vit")
        let io = try SafeTensorsFile(url: Self.repository.appendingPathComponent("Tests/ModelsTests/Fixtures/mobileclip_io.safetensors"))
        let model = try MobileCLIPModel(folder: folder)
        let view = ImageView(openCLIP: model.config.preprocess, imageSize: model.imageSize)
        XCTAssertEqual(view.filter, .bilinear)
        for (i, name) in Self.images.enumerated() {
            let image = try decodeImage(at: Self.repository.appendingPathComponent("Tests/ImagingTests/Fixtures/images/" + name))
            let got = view.apply(image)
            XCTAssertEqual([got.width, got.height], [32, 32], name)
            let want = try io.floats("view.\(i)")
            let err = zip(got.pixels, want).map { abs($0 - $1) }.max() ?? .infinity
            print("\(name) MobileCLIP view: max abs error \(err) (tolerance 1e-5)")
            XCTAssertEqual(got.pixels.count, want.count, name)
            XCTAssertLessThanOrEqual(err, 1e-5, name)
            let embedding = model.getImageFeatures(pixels: got.pixels, batch: 1), wantEmbedding = try io.floats("view.\(i).image_features")
            let scale = wantEmbedding.map(abs).max()!
            let embeddingErr = zip(embedding, wantEmbedding).map { abs($0 - $1) }.max()!
            print("\(name) MobileCLIP embedding: max abs error \(embeddingErr), scale \(scale) (tolerance 1e-4 × scale)")
            XCTAssertLessThanOrEqual(embeddingErr, 1e-4 * scale, name)
        }
    }
}
