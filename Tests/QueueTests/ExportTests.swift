// `nolad export` naming and documents as pure functions (docs/exports.md); the files themselves are
// tested with a real job in DatabaseTests/ExportCommandTests.swift.
@testable import NoladCLI
import Queue
import XCTest

final class ExportTests: XCTestCase {
    func image(_ path: String, _ label: String?, format: String = "jpeg", raw: [UInt8]? = nil) -> Export.Image {
        Export.Image(path: path, rawPath: raw ?? Array(path.utf8), format: format, sizeBytes: 1, label: label,
                     confidence: label == nil ? nil : 0.75, zeroShotLabel: label, zeroShotConfidence: label == nil ? nil : 0.5,
                     unreadable: label == nil ? "truncated JPEG" : nil)
    }

    func testClassFolders_replaceSlashesAndLeadingDots_andNumberClashesInClassOrder() {
        let folders = Export.classFolders(["cat", "AC/DC", ".hidden", "..", "AC_DC", "ac_dc"])
        XCTAssertEqual(folders["cat"], "cat")
        XCTAssertEqual(folders["AC/DC"], "AC_DC")
        XCTAssertEqual(folders[".hidden"], "_hidden")
        XCTAssertEqual(folders[".."], "_.")
        XCTAssertEqual(folders["AC_DC"], "AC_DC~2", "clashes with the sanitised AC/DC")
        XCTAssertEqual(folders["ac_dc"], "ac_dc~3", "clashes on a case-insensitive file system")
    }

    func testFlatName_joinsTheSubPathWithDoubleUnderscores_andAddsAnExtensionReadersKnow() {
        XCTAssertEqual(Export.flatName(image("red_ball/00.jpg", "a")), "red_ball__00.jpg")
        XCTAssertEqual(Export.flatName(image("a/b/c.JPEG", "a")), "a__b__c.JPEG")
        XCTAssertEqual(Export.flatName(image("scan", "a")), "scan.jpg", "found by content, so it needs a name ImageFolder reads")
        XCTAssertEqual(Export.flatName(image("x/pic.dat", "a", format: "png")), "x__pic.dat.png")
        XCTAssertEqual(Export.flatName(image(".dot.png", "a", format: "png")), "_dot.png")
    }

    func testUniqueNames_numberRepeatsBeforeTheExtension_caseInsensitively() {
        XCTAssertEqual(Export.uniqueNames(["a__b.jpg", "a__b.jpg", "A__B.jpg", "c"]), ["a__b.jpg", "a__b~2.jpg", "A__B~3.jpg", "c"])
    }

    func testImageFolderPlan_putsEachLabelledImageInItsClassFolder_andLeavesUnreadableOnesOut() {
        let images = [image("blue/00.jpg", "blue sky"), image("red/00.jpg", "blue sky"), image("red/01.png", "red/ball", format: "png"),
                      image("red/bad.jpg", nil), image("red__00.jpg", "blue sky")]
        let plan = Export.imageFolderPlan(classes: ["red/ball", "blue sky"], images: images)
        XCTAssertEqual(plan.map(\.destination), ["blue sky/blue__00.jpg", "blue sky/red__00.jpg", "red_ball/red__01.png", "blue sky/red__00~2.jpg"])
        XCTAssertEqual(plan.map(\.image.path), ["blue/00.jpg", "red/00.jpg", "red/01.png", "red__00.jpg"])
    }

    func testFiftyOnePlan_namesAreUniqueWithoutTheirExtension() {
        let plan = Export.fiftyOnePlan(images: [image("a/x.jpg", "c"), image("a/x.png", "c", format: "png"), image("b.jpg", nil)])
        XCTAssertEqual(plan.map(\.destination), ["data/a__x.jpg", "data/a__x~2.png"])
        let latin1 = image("caf\\xE9.jpg", "c", raw: Array("caf".utf8) + [0xE9] + Array(".jpg".utf8))
        XCTAssertEqual(Export.fiftyOnePlan(images: [latin1, image("caf_xE9.jpg", "c")]).map(\.destination),
                       ["data/caf_xE9.jpg", "data/caf_xE9~2.jpg"], "no backslash: FiftyOne reads it as a path separator")
        let labels = Export.fiftyOneLabels(classes: ["d", "c"], plan: plan)
        XCTAssertEqual(labels.jsonText, #"{"classes":["d","c"],"labels":{"a__x":{"confidence":0.75,"label":1},"a__x~2":{"confidence":0.75,"label":1}}}"#)
    }

    func testClasses_areTheJobsThenOtherLabelsSorted() {
        XCTAssertEqual(Export.classes(job: ["b", "a"], images: [image("1.jpg", "unknown"), image("2.jpg", "a"), image("3.jpg", "other")]),
                       ["b", "a", "other", "unknown"])
    }

    func testLabelStudioConfig_escapesClassNames_andNamesMatchTheTasks() {
        let xml = Export.labelStudioConfig(classes: ["cat", "R&D <\"x\">"])
        XCTAssertEqual(xml, """
            <View>
              <Image name="image" value="$image"/>
              <Choices name="label" toName="image" choice="single" showInLine="true">
                <Choice value="cat"/>
                <Choice value="R&amp;D &lt;&quot;x&quot;&gt;"/>
              </Choices>
            </View>

            """)
        let tasks = Export.labelStudioTasks(jobID: 4, collection: "/c", images: [image("a b/é#1.jpg", "cat"), image("z.jpg", nil)], urlPrefix: "/data/local-files/?d=c/")
        XCTAssertEqual(tasks.jsonText, #"[{"data":{"image":"/data/local-files/?d=c/a%20b/%C3%A9%231.jpg","path":"a b/é#1.jpg","zero_shot_confidence":0.5,"zero_shot_label":"cat"},"predictions":[{"model_version":"nolad job 4","result":[{"from_name":"label","id":"nolad-0","to_name":"image","type":"choices","value":{"choices":["cat"]}}],"score":0.75}]}]"#)
    }

    func testImageReference_isTheFilePath_orAFileURLOfTheExactBytesForNamesNotUTF8() {
        let plain = image("x/a b.jpg", "c")
        XCTAssertEqual(Export.imageReference(collection: "/photos", image: plain, urlPrefix: nil), "/photos/x/a b.jpg")
        let latin1 = image("caf\\xE9.jpg", "c", raw: Array("caf".utf8) + [0xE9] + Array(".jpg".utf8))
        XCTAssertEqual(Export.imageReference(collection: "/photos", image: latin1, urlPrefix: nil), "file:///photos/caf%E9.jpg")
        XCTAssertEqual(Export.imageReference(collection: "/photos", image: latin1, urlPrefix: "http://h/"), "http://h/caf%E9.jpg")
    }
}
