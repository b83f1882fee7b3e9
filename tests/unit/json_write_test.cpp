// The JSON writer: escaping, numbers, and JsonWriter's nesting and separators.
#include "tm/json_write.hpp"

#include <gtest/gtest.h>
#include <simdjson.h>

#include <stdexcept>

TEST(JsonWriter, NestsAndSeparates) {
    tmc::JsonWriter w;
    w.object().field("id", 3).field("name", "a\"b\n").key("tokens").array().value(1).value(int64_t(-2)).end();
    w.key("p").value(0.5).key("ok").value(true).key("none").null().key("e").object().end();
    w.key("x").string_or_null("").key("raw").raw("[1]").end();
    EXPECT_EQ(w.str(),
              "{\"id\": 3, \"name\": \"a\\\"b\\n\", \"tokens\": [1, -2], \"p\": 0.5, \"ok\": true, \"none\": null, "
              "\"e\": {}, \"x\": null, \"raw\": [1]}");
    simdjson::dom::parser p;
    EXPECT_FALSE(p.parse(simdjson::padded_string(w.str())).error());
}

TEST(JsonWriter, InvalidUtf8BecomesReplacementCharacters) {
    tmc::JsonWriter w;
    w.array().value(std::string_view("ok \xff end")).end();
    EXPECT_EQ(w.str(), "[\"ok \xef\xbf\xbd end\"]");
}

TEST(JsonWriter, MisuseThrows) {
    tmc::JsonWriter a;
    a.object();
    EXPECT_THROW(a.value(1), std::logic_error);  // a value without a key
    tmc::JsonWriter b;
    EXPECT_THROW(b.end(), std::logic_error);
    tmc::JsonWriter c;
    c.array();
    EXPECT_THROW(c.key("k"), std::logic_error);
    tmc::JsonWriter d;
    d.value(1);
    EXPECT_THROW(d.value(2), std::logic_error);  // two top-level values
}
